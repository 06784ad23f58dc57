"""The benchmark's small mode runs end to end, so it cannot rot. Not timed: no speed asserts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy.engine import make_url

from bench.history import FLOOR_RUNS
from bench.run import TABLES, print_table, run, write_results
from bench.scenario import SMALL


@pytest.mark.db
def test_small_benchmark_runs_end_to_end(
    pg_server_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = run(SMALL, server_url=pg_server_url)

    assert result["completed"]
    phases = result["phases"]
    assert set(phases) == {
        "floor", "load_floor", "full_sync", "no_change_resync", "changed_resync", "baseline",
    }  # fmt: skip
    assert phases["load_floor"]["items"] == SMALL.images
    assert phases["load_floor"]["rows_written"] == phases["full_sync"]["rows_written"]
    assert phases["floor"]["items"] == SMALL.images
    assert phases["full_sync"]["totals"]["created"] == SMALL.images
    assert phases["full_sync"]["rows_written"]["images"] == SMALL.images
    assert phases["no_change_resync"]["rows_written"] == {t: 0 for t in TABLES}
    assert phases["no_change_resync"]["totals"]["unchanged"] == SMALL.images
    changed = phases["changed_resync"]
    assert changed["rows_written"]["image_events"] == sum(changed["catalogue_changes"].values())
    assert phases["baseline"]["rows_fetched"] > 0
    assert all(p["peak_rss_mb"] > 0 for p in phases.values())

    print_table(result)
    assert "no_change_resync" in capsys.readouterr().out
    path = write_results(result, tmp_path)
    assert json.loads(path.read_text())["targets"]["no_change_rows_written"]["met"]
    assert (tmp_path / "latest-small.json").exists()


@pytest.mark.db
def test_scale_benchmark_runs_in_a_tiny_mode(
    pg_server_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``make bench-scale``'s code at 300 images (not timed), then ``python -m
    bench.pit_floor``'s on the database it kept."""
    from bench.scale import print_scale, run_scale

    result = run_scale((300,), server_url=pg_server_url, history=True, keep_database=True)

    size = result["sizes"]["300"]
    try:
        assert size["full_sync"]["totals"]["created"] == 300
        assert size["load_floor"]["rows_written"] == size["full_sync"]["rows_written"]
        assert size["no_change_resync"]["rows_written"] == {t: 0 for t in TABLES}
        assert size["bytes_per_image"]["images"] > 0
        assert size["full_sync"]["cpu_us_per_image"] > 0
        history = size["history"]
        assert history["images"] == 300
        # Three rounds, each updating the two thirds of the images not picked out for it.
        assert history["events"] == 300 + 2 * 300
        assert history["versions"] == history["events"]
        assert "Index" in history["queries"]["image@latest"]["plan"]
        assert history["queries"]["whole_read_out@latest"]["rows"] == 300
        # The big partition's floor: the very rows the form returns, as many runs of each.
        for moment in ("latest", "between_rounds_1_and_2"):
            form, floor = (
                history["queries"][f"{q}@{moment}"] for q in ("partition", "partition_floor")
            )
            assert len(form["runs_ms"]) == len(floor["runs_ms"]) == FLOOR_RUNS
            assert form["rows"] == floor["rows"] > 0
        assert all(size[p]["simulator_cpu_seconds"] >= 0 for p in ("load_floor", "full_sync"))
        print_scale(result)
        assert "no_change_resync" in capsys.readouterr().out
        _check_floor_breakdown(pg_server_url, size)
    finally:
        admin = make_url(pg_server_url).set(drivername="postgresql")
        with psycopg.connect(admin.render_as_string(False), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE "{size["kept_database"]}" WITH (FORCE)')


def _check_floor_breakdown(server_url: str, size: dict[str, Any]) -> None:
    """bench.pit_floor on a kept tiny history: every query runs, the form and the
    floors return the form's rows, no table is left."""
    from bench.pit_floor import breakdown

    url = make_url(server_url).set(drivername="postgresql", database=size["kept_database"])
    dsn = url.render_as_string(hide_password=False)
    measured = breakdown(dsn, size["history"]["moments"]["latest"], runs=2)
    assert all(len(q["ms"]) == 2 for q in measured.values())
    rows = {measured[q]["rows"] for q in ("form", "floor", "floor_disks_last", "floor_no_disks")}
    assert rows == {size["history"]["queries"]["partition@latest"]["rows"]}
    with psycopg.connect(dsn) as conn:
        left = conn.execute("SELECT count(*) FROM pg_tables WHERE tablename LIKE 'pit_floor%'")
        assert left.fetchone() == (0,)


def test_scale_benchmark_finds_the_simulators_cpu() -> None:
    """The simulator's CPU column reads the process serving that endpoint: one just
    started has spent CPU building its catalogue; an endpoint nobody serves reads 0."""
    from bench.run import simulator
    from bench.scale import scale_scenario, simulator_cpu

    with simulator(scale_scenario(300)) as endpoint:
        assert simulator_cpu(endpoint)() > 0
    assert simulator_cpu(endpoint)() == 0


def test_fast_normalisation_builds_the_rows_the_careful_path_builds() -> None:
    """The speed-up of normalize_image must not change a single row."""
    from service.normalize import _normalize_careful, _normalize_plain
    from service.simulator.catalogue import Catalogue

    catalogue = Catalogue(seed=11, images=3000)
    checked = 0
    for region, source in catalogue.partitions():
        for item in catalogue.images(region, source):
            fast = _normalize_plain(item, region, source)
            assert fast is not None, item
            assert fast == _normalize_careful(item, region_id=region, image_source=source)
            checked += 1
    assert checked == 3000
    odd = {"imageId": "img-odd", "progress": 7.0, "sizeMB": "12", "offline": "true"}
    assert _normalize_plain(odd, "cn-north-1", "public") is None  # coercions: careful path


@pytest.mark.db
def test_accounts_tick_syncs_each_partition_once_and_stores_images_once(
    pg_server_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """5 accounts x 2 regions (3 roles, 2 key pairs), 3 daemons then 1: not timed."""
    from bench.accounts import CI, print_accounts, run_accounts, tick_problems

    result = run_accounts(CI, server_url=pg_server_url)

    expected = result["expected"]
    assert expected["partitions"] == 2 * 3 + 5 * 2 * 2
    assert expected["roles"] == 3 and expected["private_images"] == 5 * 2 * 3
    assert set(result["ticks"]) == {"3", "1"}
    for tick in result["ticks"].values():
        assert tick_problems(tick, expected) == []
        assert tick["partitions_succeeded"] == expected["partitions"]
        assert tick["succeeded_twice"] == 0
        assert tick["catalogue_images"] == expected["catalogue_images"] > 0
        assert tick["images"] == expected["catalogue_images"] + expected["private_images"]
    assert result["ticks"]["3"]["processes_that_ran"] >= 1
    assert result["ticks"]["1"]["assume_role_calls"] == expected["roles"]  # not per partition
    print_accounts(result)
    assert "assumeRole" in capsys.readouterr().out
