//! What a message is, wherever it is: its body (text, JSON or a blob's description), a
//! blob's metadata, and a message as a recipient's mailbox holds it. Plain data shared by
//! the wire dialects (`protocol`), the stores and delivery; it depends on nothing else in
//! the crate.

/// What a message carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// Plain text (hash dialect, seed JSON string `msg`, Pigeon JSON string `body`).
    Text(String),
    /// A JSON value other than a string, kept as its compact serialized text.
    Json(String),
    /// A binary blob: its `BlobMeta` as JSON text; the bytes live in the store's blob
    /// storage under `BlobMeta::key`.
    Blob(String),
}

impl Body {
    /// Storage tag: 0 text, 1 JSON, 2 blob.
    pub fn kind(&self) -> i64 {
        match self {
            Body::Text(_) => 0,
            Body::Json(_) => 1,
            Body::Blob(_) => 2,
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Body::Text(s) | Body::Json(s) | Body::Blob(s) => s,
        }
    }

    /// Rebuilds a body from its storage tag and text.
    pub fn from_parts(kind: i64, text: String) -> Body {
        match kind {
            1 => Body::Json(text),
            2 => Body::Blob(text),
            _ => Body::Text(text),
        }
    }

    /// What this body counts against quotas: its stored text, plus the blob's size.
    pub fn stored_bytes(&self) -> u64 {
        let blob = self.blob_meta().map_or(0, |m| m.size);
        (self.as_str().len() as u64).saturating_add(blob)
    }

    /// The blob's description, when this is a blob.
    pub fn blob_meta(&self) -> Option<BlobMeta> {
        match self {
            Body::Blob(s) => serde_json::from_str(s).ok(),
            _ => None,
        }
    }
}

/// What the mailbox keeps about a blob; the bytes are in blob storage under `key`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BlobMeta {
    pub key: String,
    /// The sender's transfer id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub name: String,
    pub mime: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

impl BlobMeta {
    pub fn to_body(&self) -> Body {
        // Serializing a struct of strings and numbers cannot fail.
        Body::Blob(serde_json::to_string(self).unwrap_or_default())
    }
}

/// A message held in a recipient's mailbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub seq: u64,
    pub sender: String,
    pub recipient: String,
    pub client_id: Option<String>,
    pub body: Body,
    pub accepted_at: i64,
}
