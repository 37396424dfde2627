import socket, httpx
B="http://127.0.0.1:18225"
for hdrs in [{}, {"Authorization":"Bearer k2"}, {"Authorization":"Bearer k1"}, {"Authorization":"k1"}, {"Authorization":"Bearer  k1"}, {"Authorization":"bearer k1"}, {"x-api-key":"k1"}]:
    r = httpx.post(B+"/v1/completions", json={"model":"synthetic:tiny","prompt":"hi","max_tokens":2}, headers=hdrs); print(hdrs, r.status_code, r.text[:120])
for path in ["/health", "/metrics", "/v1/models", "/v1/models/synthetic:tiny", "/tokenize", "/version"]:
    r = httpx.request("GET" if path != "/tokenize" else "POST", B+path, json={"prompt":"x"} if path=="/tokenize" else None); print(path, r.status_code, r.text[:80])
# key checked before body: send headers with huge CL and no body, no key
s = socket.create_connection(("127.0.0.1", 18225), timeout=3)
s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n\r\n")
try: print("no key, body pending:", s.recv(300)[:200])
except Exception as e: print("no key, body pending:", repr(e))
s = socket.create_connection(("127.0.0.1", 18225), timeout=3)
s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 999999999\r\n\r\n")
try: print("no key, CL over limit:", s.recv(300)[:200])
except Exception as e: print(repr(e))
s = socket.create_connection(("127.0.0.1", 18225), timeout=3)
s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k1\r\nTransfer-Encoding: chunked\r\n\r\n")
try: print("key, chunked pending:", s.recv(300)[:100])
except Exception as e: print("key, chunked pending:", repr(e))
r = httpx.post(B+"/v1/completions", content=b"garbage", headers={"content-type":"application/json"}); print("no key garbage", r.status_code, r.text[:100])
