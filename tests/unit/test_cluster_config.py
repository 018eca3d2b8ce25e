"""[cluster] keys, device placement over nodes, and Ray staying out of single-host campaigns."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from runtime.errors import ConfigError
from testbed.campaign import ClusterSpec, load_campaign
from testbed.cluster import place_devices

ROOT = Path(__file__).resolve().parents[2]
CAMPAIGN = """
[campaign]
name = "cl"
[stop]
rounds = 1
duration_board_s = 60
[train]
local_steps = 2
{extra}
[[fleet]]
name = "pi5"
board = "rpi5"
count = {count}
{link}
"""


def write(tmp_path: Path, extra: str = "", link: str = "", count: int = 2) -> Path:
    path = tmp_path / "cl.toml"
    path.write_text(CAMPAIGN.format(extra=extra, link=link, count=count))
    return path


def test_cluster_table_is_read_and_checked(tmp_path: Path) -> None:
    assert load_campaign(write(tmp_path)).cluster is None
    c = load_campaign(write(tmp_path, '[cluster]\nengine = "ray"\naddress = "ray://10.0.0.5:10001"'))
    assert c.cluster == ClusterSpec("ray", "ray://10.0.0.5:10001")
    assert load_campaign(write(tmp_path, "[cluster]\n")).cluster == ClusterSpec("ray", "auto")


@pytest.mark.parametrize("extra, needle", [
    ('[cluster]\nengine = "dask"', "engine must be one of ray; got 'dask'"),
    ('[cluster]\naddress = "10.0.0.5:6379"', "address must be \"auto\" or \"ray://HOST:PORT\", got '10.0.0.5:6379'"),
    ('[cluster]\naddress = "ray://host:port"', "got 'ray://host:port'"),
    ('[cluster]\nnodes = 3', "unknown key 'nodes'"),
])
def test_bad_cluster_table_is_one_clear_error(tmp_path: Path, extra: str, needle: str) -> None:
    with pytest.raises(ConfigError, match="cluster") as info:
        load_campaign(write(tmp_path, extra))
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_link_shaping_with_cluster_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="link shaping is not supported with \\[cluster\\]"):
        load_campaign(write(tmp_path, "[cluster]", link='link = { kind = "wifi" }'))


def test_devices_are_placed_by_the_cpus_each_node_offers() -> None:
    ids = [f"d{i}" for i in range(8)]
    assert place_devices(ids, {"a": 1, "b": 1}) == {"a": ids[:4], "b": ids[4:]}
    # The head offers no CPU: it gets no device. 3 : 1 CPUs -> 6 : 2 devices, fleet order kept.
    assert place_devices(ids, {"head": 0, "a": 3, "b": 1}) == {"a": ids[:6], "b": ids[6:]}
    # Largest remainder: 8 over 3 equal nodes is 3, 3, 2 (ties go to the earlier node).
    assert [len(v) for v in place_devices(ids, {"a": 2, "b": 2, "c": 2}).values()] == [3, 3, 2]
    assert place_devices(ids[:1], {"a": 1, "b": 1}) == {"a": ids[:1]}
    with pytest.raises(ConfigError, match="no node of the Ray cluster offers a CPU"):
        place_devices(ids, {"head": 0})


def test_a_campaign_without_cluster_never_imports_ray(tmp_path: Path) -> None:
    path = write(tmp_path, count=1)
    code = (
        "import sys\n"
        "from testbed.cli import main\n"
        "from testbed.campaign import load_campaign\n"
        f"load_campaign({str(write(tmp_path.parent, '[cluster]'))!r})  # reading [cluster] imports no Ray either\n"
        f"code = main(['campaign', 'run', {str(path)!r}, '--out', {str(tmp_path / 'run')!r}, '--no-throttle', "
        "'--quiet'])\n"
        "assert code == 0, code\n"
        "print('RAY' if any(m == 'ray' or m.startswith('ray.') for m in sys.modules) else 'NO-RAY')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "NO-RAY"
    assert (tmp_path / "run" / "summary.json").is_file()


def test_a_node_gets_its_devices_files_and_the_trace_files_they_name(tmp_path: Path) -> None:
    from testbed.cluster import _files_for

    (tmp_path / "traces").mkdir()
    (tmp_path / "traces" / "a.json").write_text('{"active": [[0, 10]]}')
    path = write(tmp_path, link='availability = { kind = "file", path = "traces/a.json" }', count=3)
    c = load_campaign(path)
    run = tmp_path / "run"
    for sub in ("configs", "shards", "secrets"):
        (run / sub).mkdir(parents=True)
    for i in range(3):
        (run / "configs" / f"pi5-{i}.toml").write_text(f"# {i}")
        (run / "shards" / f"pi5-{i}.npz").write_bytes(bytes([i]))
        (run / "secrets" / f"pi5-{i}.toml").write_text(f"key {i}")
    (run / "secrets" / "server.toml").write_text("every device's key")
    files = _files_for(run, c, ["pi5-1", "pi5-2"])
    # Its devices' own credentials, never another device's nor the server's (which holds every key).
    assert files == {"configs/pi5-1.toml": b"# 1", "shards/pi5-1.npz": b"\x01", "secrets/pi5-1.toml": b"key 1",
                     "configs/pi5-2.toml": b"# 2", "shards/pi5-2.npz": b"\x02", "secrets/pi5-2.toml": b"key 2",
                     "campaign/traces/a.json": b'{"active": [[0, 10]]}'}
