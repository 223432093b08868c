// Benchmark peer: a bare Node.js relay with the npm `ws` package. It speaks Pigeon's hash
// dialect (`from#body#to`; the first frame names the sender), keeps no storage and takes
// no acks, and answers the sender like Pigeon: `send success`, preceded by `Out Line` when
// the recipient is offline (the message is then dropped). Usage: node node_ws_relay.js PORT
'use strict';
const { WebSocketServer } = require('ws');

const port = Number(process.argv[2] || 8081);
const users = new Map(); // name -> WebSocket
const wss = new WebSocketServer({ host: '127.0.0.1', port, perMessageDeflate: false });

wss.on('connection', (ws) => {
  let me = null;
  ws.on('message', (data, isBinary) => {
    if (isBinary) return;
    const text = data.toString();
    const first = text.indexOf('#');
    const last = text.lastIndexOf('#');
    if (first < 0 || first === last) {
      ws.send('!error#bad_frame#expected from#msg#to');
      return;
    }
    const from = text.slice(0, first);
    const to = text.slice(last + 1);
    if (me === null) {
      me = from;
      users.set(me, ws);
    }
    const peer = users.get(to);
    if (peer) {
      peer.send(text);
    } else {
      ws.send('Out Line');
    }
    ws.send('send success');
  });
  ws.on('close', () => {
    if (me !== null && users.get(me) === ws) users.delete(me);
  });
  ws.on('error', () => {});
});
wss.on('listening', () => console.log(`node ws relay on 127.0.0.1:${port}`));
