import sys, tempfile
from pathlib import Path
from bench.cluster import Redis, ServerProcess
from bench.unknown_ids import others
redis = Redis()
server = ServerProcess(Path(tempfile.mkdtemp()) / "s.log", "--workers", sys.argv[3], "--state-store", redis.url, "--max-sessions", sys.argv[2])
try:
    others(server.address, int(sys.argv[1]), 3)
finally:
    server.stop(); redis.stop()
