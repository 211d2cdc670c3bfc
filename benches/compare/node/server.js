// Minimal Node `ws` chat server: the subset of the loopchat protocol that
// loopchat-load needs (welcome, joined, join, message broadcast, leave).
// Usage: node server.js [port]   (listens on 127.0.0.1 only)
'use strict';
const http = require('http');
const { WebSocketServer } = require('ws');
const port = Number(process.argv[2] || 8090);
const rooms = new Map(); // name -> { id, members: Set<ws> }
let guests = 0, conns = 0;
const server = http.createServer((req, res) => {
  const body = req.url === '/stats' ? JSON.stringify({ connections: conns }) : 'not found';
  res.writeHead(req.url === '/stats' ? 200 : 404, { 'Connection': 'close' });
  res.end(body);
});
const wss = new WebSocketServer({ server, perMessageDeflate: false });
const room = (name) => rooms.get(name) || rooms.set(name, { id: 0, members: new Set() }).get(name);
const send = (r, obj) => { const s = JSON.stringify(obj); for (const m of r.members) m.send(s); };
wss.on('connection', (ws, req) => {
  const q = new URL(req.url, 'http://x').searchParams;
  const user = q.get('username') || `guest-${++guests}`, name = q.get('room') || 'default';
  const r = room(name); conns++;
  ws.send(JSON.stringify({ type: 'welcome', content: `welcome, ${user}`, user, room: name }));
  r.members.add(ws);
  ws.send(JSON.stringify({ type: 'joined', content: `joined ${name}`, room: name, users: [...r.members].map((m) => m.user), history: [] }));
  ws.user = user;
  send(r, { type: 'join', content: `${user} joined`, room: name, user });
  ws.on('message', (data) => {
    let m; try { m = JSON.parse(data); } catch { return; }
    if (m.type !== 'message' || typeof m.content !== 'string') return;
    const target = rooms.get(m.room || name);
    if (!target || !target.members.has(ws)) return;
    send(target, { type: 'message', content: m.content, room: m.room || name, user, id: ++target.id, ts: Date.now() });
  });
  ws.on('close', () => {
    conns--; r.members.delete(ws);
    if (r.members.size === 0) rooms.delete(name);
    else send(r, { type: 'leave', content: `${user} left`, room: name, user });
  });
});
server.listen(port, '127.0.0.1');
