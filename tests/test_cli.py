"""The kvplug command, run in-process with typer's runner against real stores."""

import json

from typer.testing import CliRunner

from kvplug.cli import app
from kvplug.connectors import open_store
from kvplug.testing import free_port

runner = CliRunner()


def test_doctor_ok_on_a_disk_store(tmp_path):
    r = runner.invoke(app, ["doctor", "--store", f"file://{tmp_path}/s"])
    assert r.exit_code == 0, r.output
    assert "write/read/delete ok" in r.output and "disk free" in r.output


def test_doctor_fails_on_an_unreachable_store():
    r = runner.invoke(app, ["doctor", "--store", f"redis://127.0.0.1:{free_port()}/0?retries=0"])
    assert r.exit_code == 1
    assert "write failed" in r.output


def test_store_stats_ls_purge(tmp_path, redis_url):
    for url in (f"file://{tmp_path}/s", redis_url):
        s = open_store(url)
        s.put_many([("alpha", b"1" * 10), ("beta", b"2" * 20)])
        s.close()
        r = runner.invoke(app, ["store", "ls", url])
        assert r.exit_code == 0 and "alpha" in r.output and "beta" in r.output
        r = runner.invoke(app, ["store", "stats", url, "--json"])
        assert r.exit_code == 0, r.output
        assert json.loads(r.output)["kind"] in ("disk", "redis")
        r = runner.invoke(app, ["store", "purge", url, "--yes"])
        assert r.exit_code == 0 and "deleted 2 entries" in r.output
        s = open_store(url)
        assert s.keys() == []
        s.close()


def test_bad_url_is_a_clear_error():
    r = runner.invoke(app, ["store", "stats", "s3://x"])
    assert r.exit_code == 2 and "unknown scheme" in r.output


def test_bench_store_writes_ratios(tmp_path, redis_url):
    out = tmp_path / "r.json"
    r = runner.invoke(
        app,
        [
            "bench",
            "store",
            "memory://",
            f"file://{tmp_path}/b",
            redis_url,
            "--chunks",
            "2",
            "--rounds",
            "1",
            "--json",
            str(out),
        ],
    )
    assert r.exit_code == 0, r.output
    rows = json.loads(out.read_text())
    assert [row["store"] for row in rows] == ["memory", "file", "redis"]
    assert all(row["put_ratio"] > 0 and row["get_ratio"] > 0 for row in rows)


def test_bench_codecs_synthetic(tmp_path):
    out = tmp_path / "c.json"
    r = runner.invoke(app, ["bench", "codecs", "--tokens", "64", "--json", str(out)])
    assert r.exit_code == 0, r.output
    rows = {row["codec"].split("?")[0]: row for row in json.loads(out.read_text())}
    assert rows["raw"]["rel_l2"] == 0 and rows["zstd"]["rel_l2"] == 0
    assert rows["cachegen"]["ratio"] > 2


def test_demo(tmp_path):
    r = runner.invoke(app, ["demo", "--store-only", "--store", f"file://{tmp_path}/demo", "--tokens", "512"])
    assert r.exit_code == 0, r.output
    assert "NO" not in r.output and "512 of 512 tokens" in r.output


def test_doctor_reports_an_untested_sglang(tmp_path, monkeypatch):
    import kvplug.cli as cli

    real = cli._version
    monkeypatch.setattr(cli, "_version", lambda d: "0.5.22" if d == "sglang" else real(d))
    r = runner.invoke(app, ["doctor", "--store", f"file://{tmp_path}/s"])
    line = next(ln for ln in r.output.splitlines() if "sglang" in ln)
    assert "0.5.22" in line and "tested: 0.5.23" in line and "untested version" in line


def test_eval_run_rejects_an_unknown_method_before_loading_a_model(tmp_path):
    r = runner.invoke(app, ["eval", "run", "--methods", "snapkv,snapk", "--results", str(tmp_path / "r.jsonl")])
    assert r.exit_code != 0
    assert "snapk" in str(r.exception) and "snapkv" in str(r.exception)
    assert not (tmp_path / "r.jsonl").exists()
