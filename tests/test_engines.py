"""`fastclass engines` and `engines check`: canary queries against local servers in each engine's real
format, one that works, one whose page no longer parses, one that refuses us, one whose images do not decode."""
from __future__ import annotations

import json
from pathlib import Path

from tests.helpers import catalog_rows, photo_like, run_cli
from tests.webserver import EngineSite


def check(catalog: str, engine: str, site: EngineSite):
    return run_cli(["engines", "check", engine, "--engine-url", f"{engine}={site.base}", "--json"], catalog)


def test_engines_check_gives_each_engine_its_verdict_and_crawl_warns_of_a_broken_one(sqlite_catalog, tmp_path):
    sites = [EngineSite() for _ in range(4)]
    working, unparsable, refusing, undecodable = sites
    try:
        working.results["*"] = [working.add_image(f"{n}.jpg", photo_like(n, (64, 64), "JPEG")) for n in range(45)]
        unparsable.results["*"] = []
        refusing.results["*"] = [refusing.add_image("a.jpg", photo_like(1, (64, 64), "JPEG"))]
        refusing.refuse_paths.add("/search/acjson")
        undecodable.results["*"] = [undecodable.url("/special/html.jpg") + f"?{n}" for n in range(12)]

        ok = check(sqlite_catalog, "bing", working)
        assert ok.exit_code == 0, ok.output
        bing = json.loads(ok.stdout)[0]
        assert (bing["verdict"], bing["page1"], bing["page2_differs"], bing["sampled"], bing["downloaded"],
                bing["decoded"]) == ("ok", 20, True, 10, 10, 10), bing

        empty = json.loads(check(sqlite_catalog, "ddg", unparsable).stdout)[0]
        assert empty["verdict"] == "broken" and empty["problem"].startswith("parser found no results on ")
        assert Path(empty["saved_page"]).parent == tmp_path / "logs"

        refused = json.loads(check(sqlite_catalog, "baidu", refusing).stdout)[0]
        assert refused["verdict"] == "broken" and "refused our requests (HTTP 403" in refused["problem"]

        junk = json.loads(check(sqlite_catalog, "google", undecodable).stdout)[0]
        assert (junk["verdict"], junk["sampled"], junk["downloaded"], junk["decoded"]) == ("broken", 10, 10, 0)

        listed = {row["name"]: row for row in json.loads(run_cli(["engines", "--json"], sqlite_catalog).stdout)}
        assert {name: (row["health"] or {}).get("verdict") for name, row in listed.items()} == {
            "bing": "ok", "ddg": "broken", "baidu": "broken", "google": "broken", "flickr": None, "greedy": None,
            "urls": None}
        assert listed["flickr"]["needs"] == "FLICKR_API_KEY" and listed["ddg"]["default"]
        assert catalog_rows(sqlite_catalog, "SELECT count(*) FROM engine_checks") == [(4,)]
        table = run_cli(["engines"], sqlite_catalog).stdout
        assert "ddg" in table and "broken" in table

        unparsable.results["*"] = working.results["*"]
        crawled = run_cli(["crawl", "owl", "--engine", "ddg", "--engine-url", f"ddg={unparsable.base}",
                           "--max", "3"], sqlite_catalog)
        assert crawled.stderr.startswith("Warning: the ddg engine was broken at its last check (")
        assert "`fastclass engines check ddg`" in crawled.stderr
    finally:
        for site in sites:
            site.close()


def test_engines_that_need_input_cannot_be_canaried(sqlite_catalog):
    result = run_cli(["engines", "check", "greedy"], sqlite_catalog)
    assert result.exit_code == 1
    assert result.stderr == "Error: the greedy engine needs --url; a canary query cannot check it\n"
