#!/usr/bin/env python3
"""Stand-in for the camera-analytics service: serves /healthz and /counts, pings systemd's watchdog."""
import argparse, http.server, os, socket, threading, time

def notify(msg):
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(msg.encode(), addr)

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = {"/healthz": b"ok\n", "/counts": b'{"people": 0, "vehicles": 0}\n'}.get(self.path)
        self.send_response(200 if body else 404)
        self.end_headers()
        self.wfile.write(body or b"not found\n")
    def log_message(self, *args):
        pass

def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=8080)
    a = p.parse_args()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", a.port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    notify("READY=1")
    while True:
        notify("WATCHDOG=1")
        time.sleep(5)

if __name__ == "__main__":
    main()
