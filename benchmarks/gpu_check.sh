#!/usr/bin/env bash
# GPU check, ready to run on one CUDA GPU in about 9 minutes; writes one JSON file.
#
#   bash benchmarks/gpu_check.sh [OUT.json]      (default benchmarks/results/gpu/gpu_check.json)
#
# Parts (each under its own time limit, each recorded as passed / failed / skipped with its numbers):
#   cuda_tests  - pytest -m cuda: bf16 vs fp32 within tolerance, prompt sharing with SDPA, chunked head, determinism
#   throughput  - benchmarks/throughput.py --model smollm2 --quick --device cuda (fp32 + bf16 rows, vs TRL)
#   compiled    - the same job with train.compile (each decoder layer compiled by inductor), fp32 and bf16 rows
#                 beside the eager fp32 one (mfu_compiled, bf16_mfu_compiled)
#   fast_sampler - pytest -m cuda tests/test_sample_fast.py: shared-prefill sampler = pre-change tokens (fp32), its
#                 reported log-probs = a forward pass (fp32 and the bf16 sampling copy)
#   sampling    - benchmarks/throughput_sampling.py on SmolLM2 (demo shape): plain generate, the pre-change sampler,
#                 the fast one in fp32 and from a bf16 copy (speedup_vs_generate), and vLLM; reward of exoalign / vLLM
#   demo        - exoalign demo --quick --device cuda
#   full_demo   - a few steps and rounds of exoalign demo --full --device cuda at the paper's 64 prompts per step, on a
#                 SmolLM2-shaped model (Llama, 134.5M parameters) built from its config with a BPE tokeniser
#                 trained on the spot (the machine has no SmolLM2 file): the pipeline and its speed on CUDA, not quality
#   online_vllm - online EXO round on the GPU with online.backend=auto (vLLM colocated when installed, else HF:
#                 the test prints which) and log μ recomputed by the training model (tests/test_online_vllm.py -m cuda)
# Without a GPU every part is skipped with one line and the JSON says so.
set -u
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${1:-$ROOT/benchmarks/results/gpu/gpu_check.json}"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=python
WORK="$(mktemp -d "${TMPDIR:-/tmp}/exoalign-gpu-check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$(dirname "$OUT")" "$WORK/parts"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
cd "$ROOT"

has_gpu() { "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; }
GPU=0; has_gpu && GPU=1

# part NAME SECONDS CMD...: run CMD under a time limit; record status, seconds and the log's tail.
part() {
  local name="$1" limit="$2"; shift 2
  local rec="$WORK/parts/$name.json" log="$WORK/$name.log"
  if [ "$GPU" = 0 ]; then
    echo "skip: $name: no CUDA GPU on this machine"
    "$PY" - "$rec" "$name" <<'PYEOF'
import json, sys
json.dump({"status": "skipped", "reason": "no CUDA GPU on this machine"}, open(sys.argv[1], "w"))
PYEOF
    return
  fi
  local t0=$SECONDS rc=0
  timeout "$limit" "$@" >"$log" 2>&1 || rc=$?
  local status=passed; [ "$rc" = 0 ] || status=failed; [ "$rc" = 124 ] && status=timeout
  echo "$status: $name ($((SECONDS - t0)) s)"
  "$PY" - "$rec" "$status" "$rc" "$((SECONDS - t0))" "$log" "$WORK" "$name" <<'PYEOF'
import json, pathlib, sys
rec, status, rc, secs, log, work, name = sys.argv[1:]
out = {"status": status, "returncode": int(rc), "seconds": int(secs),
       "log_tail": pathlib.Path(log).read_text(errors="replace")[-2000:]}
extra = pathlib.Path(work) / f"{name}.result.json"
if extra.exists():
    out["result"] = json.loads(extra.read_text())
json.dump(out, open(rec, "w"), indent=1)
PYEOF
}

part cuda_tests 60 "$PY" -m pytest tests/test_cuda.py -m cuda -q -rs
part fast_sampler 60 "$PY" -m pytest tests/test_sample_fast.py -m cuda -q -rs
part throughput 180 "$PY" benchmarks/throughput.py --model smollm2 --quick --device cuda \
  --json "$WORK/throughput.result.json" --md "$WORK/throughput.md"
part compiled 150 "$PY" benchmarks/throughput.py --model smollm2 --quick --device cuda \
  --systems exoalign,exoalign_compiled --extra exoalign_compiled_bf16 \
  --json "$WORK/compiled.result.json" --md "$WORK/compiled.md"
part sampling 120 "$PY" benchmarks/throughput_sampling.py --device cuda --backends hf,vllm \
  --json "$WORK/sampling.result.json"
part demo 120 "$PY" -m exoalign.cli demo --quick --device cuda --out "$WORK/demo"
if [ "$GPU" = 1 ]; then
  "$PY" - "$WORK/smollm2-shaped" <<'PYEOF'
import sys
from exoalign.demo import reviews
from exoalign.models import build_model, tiny_config, train_bpe_tokenizer
texts = [r["prompt"] + r["completion"] for r in reviews.prompt_rows(reviews.generate_reviews(3000, seed=0), seed=0)]
tok = train_bpe_tokenizer(texts, vocab_size=2048, model_max_length=2048)
cfg = tiny_config(49152, model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                  num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True,
                  rms_norm_eps=1e-5, rope_theta=100000.0)
model = build_model(cfg, seed=0, tokenizer=tok)
model.save_pretrained(sys.argv[1], safe_serialization=True)
tok.save_pretrained(sys.argv[1])
PYEOF
fi
part full_demo 240 "$PY" -m exoalign.cli demo --full --device cuda --model "$WORK/smollm2-shaped" --seeds 0 \
  --out "$WORK/full-work" --results "$WORK/full-results" prompt_format=raw n_train_prompts=128 align_steps=4 \
  online_rounds=2 save_every=2 n_eval_prompts=64 eval_samples=1 max_new_tokens=24 n_bootstrap=200
part online_vllm 120 "$PY" -m pytest tests/test_online_vllm.py -m cuda -q -rs -s

"$PY" - "$OUT" "$WORK/parts" "$GPU" <<'PYEOF'
import json, pathlib, platform, sys
out, parts, gpu = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3] == "1"
import torch
res = {"gpu": torch.cuda.get_device_name(0) if gpu else None, "torch": torch.__version__,
       "platform": platform.platform(),
       "parts": {p.stem: json.loads(p.read_text()) for p in sorted(parts.glob("*.json"))}}
res["all_passed"] = gpu and all(v["status"] == "passed" for v in res["parts"].values())
pathlib.Path(out).write_text(json.dumps(res, indent=1) + "\n")
print(f"wrote {out}")
PYEOF
