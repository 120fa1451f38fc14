#!/bin/bash
# Kill/resume check from the command line: a deterministic tiny run killed with SIGKILL (and another
# interrupted with SIGINT) in the middle of epoch 2, rerun with the same command, against an uninterrupted run.
cd "$(dirname "$0")/.."
export TF_CPP_MIN_LOG_LEVEL=2  # the data as train.py finds them ($ISBI_DATA_DIR or data/)
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/kill-check}; rm -rf $OUT $OUT.*.log; mkdir -p $(dirname $OUT)
A="--preset tiny --deterministic --precision float32 --steps-per-epoch 20 --epochs 3 --backup-every 5"
$PY train.py $A --run-dir $OUT/ref > $OUT.ref.log 2>&1
for sig in KILL INT; do
  $PY train.py $A --run-dir $OUT/$sig > $OUT.$sig.1.log 2>&1 & PID=$!
  until [ -f $OUT/$sig/state.json ] && [ $OUT/$sig/backup.keras -nt $OUT/$sig/state.json ]; do sleep 0.1; done  # a backup in epoch 2
  sleep 1; kill -$sig $PID; wait $PID; echo "SIG$sig: exit code $?"
  grep -h "interrupted" $OUT.$sig.1.log
  $PY train.py $A --run-dir $OUT/$sig > $OUT.$sig.2.log 2>&1; echo "rerun exit code $?"
  grep -h "resuming" $OUT.$sig.2.log
done
$PY - <<PYEOF 2>/dev/null
import sys; sys.path.insert(0, ".")
import numpy as np, train
ref = train.load_checkpoint("$OUT/ref/last.keras")
for sig in ("KILL", "INT"):
    got = train.load_checkpoint(f"$OUT/{sig}/last.keras")
    same = all(np.array_equal(a, b) for a, b in zip(ref.get_weights(), got.get_weights()))
    print(f"SIG{sig}: steps {int(got.optimizer.iterations.numpy())} (reference {int(ref.optimizer.iterations.numpy())}), "
          f"weights identical to the uninterrupted run: {same}")
PYEOF
