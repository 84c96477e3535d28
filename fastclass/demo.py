"""`make demo`: the pipeline, offline, on the generated sample set, in ./demo/ (a fresh catalog each run)."""
from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from fastclass.sample import ATTRIBUTION, write_sample_folder


def fastclass(*args: str, catalog: Path) -> None:
    command = ["fastclass", "--catalog", str(catalog), *args]
    print(f"\n$ {shlex.join(command)}", flush=True)
    subprocess.run([sys.executable, "-m", "fastclass", *command[1:]], check=True)


def run_demo(root: Path) -> None:
    shutil.rmtree(root, ignore_errors=True)
    sample = root / "sample"
    planted = write_sample_folder(sample)
    print(f"Sample set in {sample}: {planted['images']} photos in 2 classes, plus {planted['exact_copies']} exact "
          f"copies, {planted['near_copies']} near copies and {planted['junk']} junk files.\n{ATTRIBUTION}")
    catalog = root / "fastclass.db"
    fastclass("init", catalog=catalog)
    fastclass("import", str(sample), catalog=catalog)
    fastclass("import", str(sample), catalog=catalog)
    fastclass("verify", catalog=catalog)
    fastclass("dedup", "--flip", catalog=catalog)
    fastclass("stats", catalog=catalog)
    fastclass("split", catalog=catalog)
    fastclass("snapshot", "create", "demo-v1", "--note", "the bundled sample set", catalog=catalog)
    fastclass("snapshot", "export", "demo-v1", str(root / "export"), catalog=catalog)
    print(f"\nDemo catalog: {catalog} (images in {root / 'images'}; snapshot demo-v1 exported to "
          f"{root / 'export'}).")


def main() -> None:
    run_demo(Path(sys.argv[2] if len(sys.argv) > 2 else "demo").resolve())


if __name__ == "__main__":
    main()
