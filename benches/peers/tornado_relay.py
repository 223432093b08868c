"""Benchmark peer: the tornado relay of the tutorial Pigeon grew from.

An in-memory dict of online users, frames `from#msg#to` (the first frame names the
sender), no storage and no acks. The sender is answered like Pigeon answers it:
`send success`, preceded by `Out Line` when the recipient is offline (the message is
then dropped). Usage: python tornado_relay.py PORT
"""

import sys

import tornado.ioloop
import tornado.web
import tornado.websocket


class RelayHandler(tornado.websocket.WebSocketHandler):
    users = {}

    def check_origin(self, origin):
        return True

    def open(self):
        self.user = None
        # Without it small frames wait for delayed ACKs (Nagle): 40 ms per hop.
        self.set_nodelay(True)

    def on_message(self, message):
        if isinstance(message, bytes):
            return
        first, last = message.find("#"), message.rfind("#")
        if first < 0 or first == last:
            self.write_message("!error#bad_frame#expected from#msg#to")
            return
        from_user, to_user = message[:first], message[last + 1 :]
        if self.user is None:
            self.user = from_user
            RelayHandler.users[from_user] = self
        peer = RelayHandler.users.get(to_user)
        if peer is not None:
            peer.write_message(message)
        else:
            self.write_message("Out Line")
        self.write_message("send success")

    def on_close(self):
        if self.user is not None and RelayHandler.users.get(self.user) is self:
            del RelayHandler.users[self.user]


def main():
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8082
    app = tornado.web.Application([(r"/ws", RelayHandler), (r"/ws/.*", RelayHandler)])
    app.listen(port, address="127.0.0.1")
    print(f"tornado relay on 127.0.0.1:{port}", flush=True)
    tornado.ioloop.IOLoop.current().start()


if __name__ == "__main__":
    main()
