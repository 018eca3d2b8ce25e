"""One malicious device in a real federation: final accuracy under each robust merge.

    .venv/bin/python bench/robust_federation.py --out runs/robust [--seeds 0,1] [--rounds 12] [--scale -10]

Five devices on the embedded broker, each a real process training LeNet on its digits shard with
ONNX Runtime (`orchard federate`'s layout, fedavg, 20 local steps). dev4 is `testbed.adversary`:
it trains like the others and uploads base + scale x its delta (scale -10: sign-flipped, 10x). The
clean run has the same adversary process at scale 1 (an honest device on the same code path).
Writes `robust.json` and `robust.md` (final accuracy per defence, mean and spread over seeds).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from testbed.broker import AmqttBroker  # noqa: E402
from testbed.federate import Federation, FederationSpec, prepare, server_rows  # noqa: E402
from testbed.supervisor import stop_process_groups  # noqa: E402

STALL_S = 60.0  # no new version for this long: the run is over
DEFENCES: list[tuple[str, float, dict[str, Any]]] = [
    ("clean (mean)", 1.0, {}),
    ("attacked, mean", -1.0, {}),
    ("attacked, median", -1.0, {"robust_merge": "median"}),
    ("attacked, trimmed-mean 0.2", -1.0, {"robust_merge": "trimmed-mean"}),
    ("attacked, krum f=1 m=3", -1.0, {"robust_merge": "krum", "krum_select": 3}),
    ("attacked, norm reject 3x", -1.0, {"norm_bound": "reject"}),
    ("attacked, norm clip 3x", -1.0, {"norm_bound": "clip"}),
]


def one_run(out: Path, seed: int, rounds: int, scale: float, params: dict[str, Any]) -> dict[str, Any]:
    spec = FederationSpec(out=out, devices=5, strategy="fedavg", strategy_params=params, rounds=rounds, seed=seed,
                          local_steps=20, time_limit_s=300.0, task_timeout_s=120.0)
    run = prepare(spec, force=True)
    started = time.monotonic()
    with AmqttBroker() as broker:
        fed = Federation(run, broker.url)
        log = (run / "logs" / "dev4.log").open("ab")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        adversary = subprocess.Popen(
            [sys.executable, "-m", "testbed.adversary", "--config", str(run / "configs" / "dev4.toml"),
             "--artifacts", str(run / "artifacts.json"), "--broker", broker.url, "--scale", str(scale)],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        try:
            fed.start_server()
            for device_id in spec.device_ids()[:4]:
                fed.start_device(device_id)
            assert fed.server is not None
            last, last_s, stalled = 0, time.monotonic(), False
            while fed.server.poll() is None and time.monotonic() - started < spec.time_limit_s + 60:
                time.sleep(0.5)
                if len(server_rows(run)) > last:
                    last, last_s = len(server_rows(run)), time.monotonic()
                elif time.monotonic() - last_s > STALL_S:  # every task fails (NaN loss): it will not recover
                    stalled = True
                    break
        finally:
            fed.stop_all()
            stop_process_groups([adversary], 5.0)
    rows = [r for r in server_rows(run) if r.get("accuracy")]
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines() if line.strip()]
    merged_evil = sum("dev4" in e.get("merged", e.get("devices", [])) for e in events if e["event"] == "aggregated")
    return {"seed": seed, "versions": len(rows), "final_accuracy": float(rows[-1]["accuracy"]) if rows else None,
            "dev4_merged_in": merged_evil, "stalled": stalled, "wall_s": round(time.monotonic() - started, 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "robust")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--scale", type=float, default=-10.0, help="the attacker's delta scale")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    table = []
    for name, scale, params in DEFENCES:
        runs = [one_run(args.out / f"{len(table)}-s{seed}", seed, args.rounds, args.scale if scale < 0 else 1.0,
                        params) for seed in seeds]
        accs = [r["final_accuracy"] for r in runs if r["final_accuracy"] is not None]
        row = {"defence": name, "params": params, "runs": runs,
               "accuracy_mean": round(statistics.mean(accs), 4) if accs else None,
               "accuracy_spread": round(max(accs) - min(accs), 4) if accs else None}
        table.append(row)
        print(f"{name:<28} final accuracy {row['accuracy_mean']} (spread {row['accuracy_spread']}, "
              f"seeds {seeds}); dev4 merged in {[r['dev4_merged_in'] for r in runs]} of "
              f"{[r['versions'] for r in runs]} versions", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "robust.json").write_text(json.dumps({"scale": args.scale, "rounds": args.rounds, "seeds": seeds,
                                                      "rows": table}, indent=1))
    lines = ["| defence | final accuracy (mean) | spread (max-min) | versions reached | dev4 in merges |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['defence']} | {r['accuracy_mean']} | {r['accuracy_spread']} | "
              f"{'/'.join(str(x['versions']) + (' (stalled)' if x['stalled'] else '') for x in r['runs'])} | "
              f"{sum(x['dev4_merged_in'] for x in r['runs'])}/{sum(x['versions'] for x in r['runs'])} |"
              for r in table]
    (args.out / "robust.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
