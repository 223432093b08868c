//! The `pigeon` binary: command-line parsing and logging set-up only. An error ends it
//! with one `error: ...` line on stderr and exit code 1 (never a Rust backtrace, even
//! with `RUST_BACKTRACE=1`: these are the user's errors, not the program's).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use pigeon::accounts::{self, Action, PasswordSource};
use pigeon::config::Config;

#[derive(Parser)]
#[command(
    name = "pigeon",
    version,
    about = "Point-to-point WebSocket messenger with store-and-forward delivery"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve {
        /// Configuration file (default: ./config.toml when it exists).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Listen address, overriding [server] bind: host:port (127.0.0.1:8080,
        /// localhost:8080, [::1]:8080), or :8080 for every interface.
        #[arg(long, value_parser = pigeon::config::parse_bind)]
        bind: Option<std::net::SocketAddr>,
        /// Data directory of the embedded store, overriding [storage] data_dir.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// "pretty" or "json", overriding [log] format.
        #[arg(long)]
        log_format: Option<String>,
    },
    /// Manage accounts (`[auth] mode = "password"`).
    User {
        #[command(subcommand)]
        action: UserAction,
    },
    /// Chat from the terminal: type `bob: hello`, or `/send bob ./file` to send a file.
    Chat {
        #[arg(long, short)]
        user: String,
        /// Server base URL.
        #[arg(long, default_value = "ws://127.0.0.1:8080")]
        server: String,
        /// Where received files are saved.
        #[arg(long, default_value = ".")]
        download_dir: PathBuf,
        /// Password, for servers in password mode (better: the PIGEON_PASSWORD variable).
        #[arg(long, env = "PIGEON_PASSWORD", hide_env_values = true)]
        password: Option<String>,
    },
}

/// Where the configuration comes from, for every command that opens the store.
#[derive(clap::Args)]
struct ConfigArgs {
    /// Configuration file (default: ./config.toml when it exists).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Data directory of the embedded store, overriding [storage] data_dir.
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum UserAction {
    /// Create an account; the password is prompted for, or read from standard input.
    Add {
        name: String,
        #[command(flatten)]
        cfg: ConfigArgs,
    },
    /// Delete an account (its undelivered messages stay in the store).
    Del {
        name: String,
        #[command(flatten)]
        cfg: ConfigArgs,
    },
    /// Change a password (every token issued before stops working).
    Passwd {
        name: String,
        #[command(flatten)]
        cfg: ConfigArgs,
    },
}

/// Loads the configuration the way `serve` does (unknown keys are errors).
fn load_config(config: Option<PathBuf>, data_dir: Option<PathBuf>) -> anyhow::Result<Config> {
    let path = config.or_else(|| {
        let default = PathBuf::from("config.toml");
        default.exists().then_some(default)
    });
    let (mut cfg, _) = Config::load(path.as_deref(), std::env::vars())?;
    if let Some(d) = data_dir {
        cfg.storage.data_dir = d;
    }
    Ok(cfg)
}

/// glibc's malloc raises its mmap threshold whenever a large mmapped block is freed, so
/// the next ~19 MiB argon2 blocks come from its arenas, which it keeps: after a flood of
/// parallel password logins the server held gigabytes it no longer used. A fixed
/// threshold (which also stops that adjustment) sends big blocks to mmap and back to the
/// system on free; fewer arenas keep less of the rest. `MALLOC_MMAP_THRESHOLD_` and
/// `MALLOC_ARENA_MAX` in the environment win. Called before any thread exists.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const MMAP_THRESHOLD: libc::c_int = 1024 * 1024;
        const ARENAS: libc::c_int = 4;
        // SAFETY: mallopt only sets allocator parameters; no other thread runs yet.
        unsafe {
            if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
                libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
            }
            if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
                libc::mallopt(libc::M_ARENA_MAX, ARENAS);
            }
        }
    }
}

fn main() -> ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", sentence(&e));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes as one sentence, each cause once: the errors' own messages
/// often include their source already.
fn sentence(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !out.contains(&c) {
            out.push_str(": ");
            out.push_str(&c);
        }
    }
    out
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
    match cli.command {
        Command::Serve {
            config,
            bind,
            data_dir,
            log_format,
        } => {
            let mut cfg = load_config(config, data_dir)?;
            if let Some(b) = bind {
                cfg.server.bind = b;
            }
            if let Some(f) = log_format {
                cfg.log.format = f;
            }
            init_logging(&cfg)?;
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind(cfg.server.bind)
                    .await
                    .with_context(|| format!("cannot listen on {}", cfg.server.bind))?;
                pigeon::server::run(listener, cfg, shutdown_signal()).await?;
                anyhow::Ok(())
            })
        }
        Command::User { action } => {
            let (action, name, args) = match action {
                UserAction::Add { name, cfg } => (Action::Add, name, cfg),
                UserAction::Del { name, cfg } => (Action::Delete, name, cfg),
                UserAction::Passwd { name, cfg } => (Action::Passwd, name, cfg),
            };
            let cfg = load_config(args.config, args.data_dir)?;
            let done =
                runtime.block_on(accounts::run(&cfg, action, &name, PasswordSource::Stdin))?;
            println!("{done}");
            Ok(())
        }
        Command::Chat {
            user,
            server,
            password,
            download_dir,
        } => {
            runtime.block_on(pigeon::client::chat(
                &server,
                &user,
                password.as_deref(),
                &download_dir,
            ))?;
            Ok(())
        }
    }
}

fn init_logging(cfg: &Config) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&cfg.log.level))
        .context("invalid log level")?;
    // Logs go to stderr, in colour only when that is a terminal (no escape codes in a
    // journal, a file or a pipe).
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match cfg.log.format.as_str() {
        "json" => builder.json().init(),
        "pretty" => builder.init(),
        other => anyhow::bail!("unknown log format {other:?} (pretty or json)"),
    }
    Ok(())
}

/// Completes on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
