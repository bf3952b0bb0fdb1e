"""A local S3 API (moto_server, from `moto[server]`) on 127.0.0.1 for tests: `with S3Server() as s3:`, put s3.env
in os.environ or a Ray runtime_env, use s3.uri("run/ckpt"). `python -m tp2d_exp.testing.s3_server` runs one by hand."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from tp2d_exp.testing.local_ranks import free_port

MOTO_SERVER = str(Path(sys.executable).parent / "moto_server")


class S3Server:
    """A moto_server subprocess holding one bucket; everything lives in its memory and dies with it."""

    def __init__(self, bucket: str = "tp2d"):
        self.bucket = bucket
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        # moto accepts any credentials, but botocore refuses to sign requests without some.
        self.env = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                    "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
        self._proc: subprocess.Popen[bytes] | None = None  # started by __enter__
        self._log = tempfile.TemporaryFile()  # not a pipe: moto logs every request and would block on a full one

    def uri(self, path: str = "") -> str:
        return f"s3://{self.bucket}/{path.lstrip('/')}"

    def __enter__(self) -> S3Server:
        self._proc = subprocess.Popen([MOTO_SERVER, "-H", "127.0.0.1", "-p", str(self.port)],
                                      stdout=subprocess.DEVNULL, stderr=self._log)
        try:
            self._wait_until_listening()
            # moto does not check signatures, so a bare PUT creates the bucket; no proxy: it is loopback.
            put = urllib.request.Request(f"{self.endpoint}/{self.bucket}", method="PUT")
            urllib.request.build_opener(urllib.request.ProxyHandler({})).open(put, timeout=10)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait_until_listening(self) -> None:
        for _ in range(200):  # ~20 s; it takes ~1.5 s on 2 busy cores
            if self._proc.poll() is not None:
                self._log.seek(0)
                raise RuntimeError(f"moto_server exited {self._proc.returncode}: {self._log.read().decode()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.1)
        raise TimeoutError(f"moto_server did not listen on {self.endpoint} in 20 s")

    def __exit__(self, *exc: object) -> None:
        self._proc.terminate()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._log.close()
        if "s3fs" in sys.modules:  # fsspec caches S3FileSystem instances, endpoint included, across servers
            sys.modules["s3fs"].S3FileSystem.clear_instance_cache()


if __name__ == "__main__":
    with S3Server() as s3:
        print(*(f"export {k}={v}" for k, v in s3.env.items()), f"# {s3.uri()} ready; Ctrl-C stops it", sep="\n")
        stop = {signal.SIGINT, signal.SIGTERM}  # either way the server must stop with this process
        signal.pthread_sigmask(signal.SIG_BLOCK, stop)  # sigwait only takes signals that are blocked
        signal.sigwait(stop)
