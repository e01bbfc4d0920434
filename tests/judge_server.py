"""A scripted OpenAI-compatible chat-completions server on 127.0.0.1, and a judge pointed at it.

Shared by tests/test_eval_judges_openai.py and tests/test_eval_judges_http.py.
"""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from resta_fast.eval.judges.openai import OpenAIJudge


class ScriptedServer:
    """A chat-completions server on 127.0.0.1 (port 0) answering from a script or a function."""

    def __init__(self, script=None, fn=None):
        self.script = list(script or [])
        self.fn = fn
        self.requests = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
                status, content = outer.fn(body) if outer.fn else outer.script.pop(0)
                payload = {"choices": [{"message": {"role": "assistant", "content": content}}]}
                data = json.dumps(payload if status == 200 else {"error": content}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def judge_for(server, tmp_path=None, **kw):
    sleeps = []
    kw.setdefault("concurrency", 1)
    j = OpenAIJudge(server.url, model="judge-x", sleep=sleeps.append, backoff=0.5, **kw)
    return j, sleeps
