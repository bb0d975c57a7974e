#!/bin/bash
# Instruction mix of the hottest llvmpipe (lavapipe) JIT code while a benchmark runs.
# Usage: tools/jit_anatomy.sh OUT_PREFIX DELAY_S BENCH_ARGS...
#   e.g. tools/jit_anatomy.sh /tmp/mm 8 matmul_shapes --reps 40
# Runs target/release/examples/bench with BENCH_ARGS, waits DELAY_S seconds, copies the
# process's anonymous executable mappings (the JIT code) from /proc/PID/mem, samples it with
# perf for 2 s, disassembles the mapping that holds the hot addresses with objdump and prints
# the opcode counts over the hot span (static counts: a loop body is counted once).
# Needs perf, objdump, python3 and permission to read /proc/PID/mem (same user).
set -euo pipefail
out=$1; delay=$2; shift 2
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp}
target/release/examples/bench "$@" > "$out.bench.jsonl" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
sleep "$delay"
python3 - "$pid" "$out" <<'PY'
import sys
pid, pre = int(sys.argv[1]), sys.argv[2]
for line in open(f"/proc/{pid}/maps"):
    f = line.split()
    if "x" in f[1] and len(f) < 6 and not f[0].startswith("ffff"):
        s, e = (int(x, 16) for x in f[0].split("-"))
        with open(f"/proc/{pid}/mem", "rb") as m:
            m.seek(s)
            open(f"{pre}.jit_{s:x}.bin", "wb").write(m.read(e - s))
PY
perf record -F 2000 -p "$pid" -o "$out.perf.data" -- sleep 2 > /dev/null 2>&1
perf report -i "$out.perf.data" --no-children --sort sym 2>/dev/null | grep "%" | head -200 > "$out.hot.txt" || true
python3 - "$out" <<'PY'
import collections, glob, re, subprocess, sys
pre = sys.argv[1]
hot = {}
for line in open(pre + ".hot.txt"):
    m = re.search(r"([\d.]+)%\s+\[\.\]\s+0x([0-9a-f]+)", line)
    if m:
        hot[int(m.group(2), 16)] = float(m.group(1))
for fn in glob.glob(pre + ".jit_*.bin"):
    base = int(fn.rsplit("_", 1)[1][:-4], 16)
    size = len(open(fn, "rb").read())
    h = {a: v for a, v in hot.items() if base <= a < base + size}
    if not h:
        continue
    dis = subprocess.run(["objdump", "-D", "-b", "binary", "-m", "i386:x86-64",
                          f"--adjust-vma={base:#x}", fn], capture_output=True, text=True).stdout
    open(pre + ".dis", "w").write(dis)
    lo, hi = min(h), max(h)
    cnt = collections.Counter()
    for line in dis.split("\n"):
        m = re.match(r"\s*([0-9a-f]+):\s+(?:[0-9a-f]{2} )+\s*(\S+)", line)
        if m and lo <= int(m.group(1), 16) <= hi:
            cnt[m.group(2)] += 1
    print(f"samples in this mapping: {sum(h.values()):.1f} % (of the sampled top 200 addresses); "
          f"hot span {hi - lo} bytes, {sum(cnt.values())} instructions")
    print(" ".join(f"{k}:{v}" for k, v in cnt.most_common(16)))
PY
