#!/usr/bin/env python3
"""moet vs PyTorch + HF transformers: training steps of the same model, side by side.

Runs `moet bench CONFIG` and then the same model as HF transformers' OlmoeForCausalLM trained
in PyTorch (AdamW, gradient clipping 1.0, the config's micro_batch x seq_len of random token
ids, labels = input_ids, the load-balancing loss on) in the same invocation, on the same
machine and threads, and prints one table: median step time after warm-up, tokens/s, MFU
(ARCHITECTURE §10: 6*N_active + 12*L*d_model*seq_len FLOPs per token, against the sgemm peak
moet measures on the CPU or the GPU's dense bf16 peak) and peak memory, with the moet / peer
ratio.

  CPU:  torch.set_num_threads(THREADS), fp32 (moet: fp32 + OpenBLAS).
        --precision bf16: moet with bf16 GEMM operands (oneDNN, AVX512-BF16), against PyTorch
        twice: fp32 (the peer above) and bf16 autocast on the CPU (the same arithmetic);
        MFU is then against the bf16 GEMM peak moet measures.
  GPU:  bf16 autocast with fp32 master weights (moet: bf16 GEMMs with fp32 accumulation and
        fp32 master weights); --compile adds a torch.compile'd run of the same model.

  --vary-tokens: new random tokens every step in both (moet bench --vary-tokens), so that the
        experts' row counts change from step to step as in training; by default both train on
        one batch.

usage: python3 bench/vs_pytorch.py MOET CONFIG [--steps N] [--warmup W] [--threads T]
                                   [--device cpu|cuda] [--precision fp32|bf16] [--compile]
                                   [--vary-tokens] [--set k=v]...
Needs torch and transformers (pip). Results: bench/results/.
"""
import argparse
import configparser
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time


def read_config(path, sets):
    ini = configparser.ConfigParser(inline_comment_prefixes=("#", ";"))
    ini.read(path)
    for kv in sets:
        key, val = kv.split("=", 1)
        sec, k = key.split(".", 1)
        ini[sec][k] = val
    m, e, t = ini["model"], ini["moe"], ini["train"]
    c = dict(
        D=m.getint("d_model"), L=m.getint("n_layers"), H=m.getint("n_heads"),
        V=m.getint("vocab_size"), max_seq=m.getint("max_seq_len"),
        theta=m.getfloat("rope_theta"), eps=m.getfloat("norm_eps"),
        E=e.getint("n_experts"), k=e.getint("top_k", fallback=1),
        F=e.getint("expert_d_ff", fallback=0) if e.getint("n_experts") > 0 else m.getint("d_ff"),
        norm_topk=e.getboolean("norm_topk_prob", fallback=False),
        lb=e.getfloat("lb_coef", fallback=0.01),
        B=t.getint("micro_batch"), T=t.getint("seq_len"),
        lr=ini["optim"].getfloat("lr", fallback=4e-4) if ini.has_section("optim") else 4e-4)
    c["Vpad"] = (c["V"] + 127) // 128 * 128
    return c


def flops_per_token(c):
    """ARCHITECTURE §10, as model_flops_per_token: 6 N_active + 12 L D T."""
    L, D, E, k, F, V = c["L"], c["D"], max(c["E"], 1), c["k"], c["F"], c["Vpad"]
    n_active = L * 4 * D * D + (L * E * D if c["E"] > 0 else 0) + L * k * 3 * D * F + V * D
    return 6 * n_active + 12 * L * D * c["T"]


def run_moet(moet, config, args):
    cmd = [moet, "bench", config, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--set", f"train.device={args.device}"]
    if args.precision:
        cmd += ["--set", f"train.precision={args.precision}"]
    if args.vary_tokens:
        cmd += ["--vary-tokens"]
    for kv in args.set:
        cmd += ["--set", kv]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    print("$ " + " ".join(cmd), flush=True)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(f"vs_pytorch: moet bench failed ({out.returncode}):\n{out.stderr}")
    text = out.stdout
    print(text, flush=True)

    def grab(pattern, cast=float):
        m = re.search(pattern, text)
        return cast(m.group(1)) if m else None

    peak = grab(r"(?:sgemm|bf16 GEMM) peak \([^)]*\): ([0-9.]+) GFLOP/s")
    before_after = grab(r"measured (?:sgemm|bf16 GEMM) peak \(([0-9.]+) GFLOP/s")
    gpu = grab(r"peak: ([0-9.]+) TFLOP/s")
    r = dict(step=grab(r"step time \(median of \d+\): ([0-9.]+) s"),
             tok=grab(r"tokens/s:\s+([0-9.]+)"), mfu=grab(r"MFU:\s+([0-9.]+)%"),
             rss=grab(r"peak memory \(RSS\):\s+([0-9.]+) MiB"),
             dev=grab(r"peak device memory:\s+([0-9.]+) GiB"))
    r["peak_gflops"] = before_after or peak or (gpu * 1e3 if gpu else None)
    r["peak_kind"] = "measured bf16 GEMM peak" if "bf16 GEMM peak" in text else "measured sgemm peak"
    return r


def build_hf(c, device):
    import torch
    from transformers import OlmoeConfig, OlmoeForCausalLM
    cfg = OlmoeConfig(
        vocab_size=c["Vpad"], hidden_size=c["D"], intermediate_size=c["F"],
        num_hidden_layers=c["L"], num_attention_heads=c["H"], num_key_value_heads=c["H"],
        max_position_embeddings=c["max_seq"], rms_norm_eps=c["eps"], rope_theta=c["theta"],
        num_experts=max(c["E"], 1), num_experts_per_tok=c["k"] if c["E"] > 0 else 1,
        norm_topk_prob=c["norm_topk"] if c["E"] > 0 else True, output_router_logits=True,
        router_aux_loss_coef=c["lb"], pad_token_id=None, bos_token_id=None, eos_token_id=None,
        tie_word_embeddings=False)
    torch.manual_seed(0)
    return OlmoeForCausalLM(cfg).to(device).train()


def run_torch(c, args, compile_model, bf16):
    import torch
    torch.set_num_threads(args.threads)
    dev = args.device
    model = build_hf(c, dev)
    impl = getattr(model.config, "_experts_implementation", None) or "default"
    attn = model.config._attn_implementation
    if compile_model:
        model = torch.compile(model)
    # at 1e-3 of the config's learning rate, as `moet bench` steps: the weights and the routing
    # stay near their initial state, so every timed step does the same work in both. (At the
    # full rate the model memorises the one batch within a few steps, its routing drifts, and
    # the CPU steps of HF's expert loop got faster step after step: 15.9 -> 10.7 s.)
    opt = torch.optim.AdamW(model.parameters(), lr=c["lr"] * 1e-3, betas=(0.9, 0.95), eps=1e-8,
                            weight_decay=0.1)
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, c["V"], (c["B"], c["T"]), generator=g).to(dev)
    times = []
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(args.warmup + args.steps):
        if args.vary_tokens and i > 0:  # drawn outside the timed part, as moet bench does
            ids = torch.randint(0, c["V"], (c["B"], c["T"]), generator=g).to(dev)
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device_type=dev, dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        label = "warm-up" if i < args.warmup else "timed"
        print(f"  torch{' (compiled)' if compile_model else ''}{' bf16' if bf16 else ''} "
              f"step {i + 1} ({label}): "
              f"{dt:.3f} s, loss {loss.item():.4f}", flush=True)
        if i >= args.warmup:
            times.append(dt)
    step = statistics.median(times)
    r = dict(step=step, tok=c["B"] * c["T"] / step,
             rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
             dev=torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else None,
             what=f"torch {torch.__version__}, transformers OlmoeForCausalLM (attention "
                  f"{attn}, experts {impl}){', torch.compile' if compile_model else ''}"
                  f"{', bf16 autocast' if bf16 else ', fp32'}")
    return r


def peer_(args, bf16, compile_model):
    """One PyTorch run in a process of its own, so that its peak memory is its own."""
    cmd = [sys.executable, os.path.abspath(__file__), args.moet, args.config,
           "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--threads", str(args.threads), "--device", args.device,
           "--peer", ("bf16" if bf16 else "fp32") + ("-compile" if compile_model else "")]
    if args.vary_tokens:
        cmd += ["--vary-tokens"]
    for kv in args.set:
        cmd += ["--set", kv]
    result = None
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as p:
        for line in p.stdout:  # its step lines as they come
            if line.startswith("PEER_RESULT "):
                result = json.loads(line[len("PEER_RESULT "):])
            else:
                print(line, end="", flush=True)
    if p.returncode != 0 or result is None:
        sys.exit(f"vs_pytorch: the PyTorch run failed ({p.returncode})")
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("moet")
    ap.add_argument("config")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                    help="GEMM precision (default: bf16 on cuda, fp32 on cpu)")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--vary-tokens", action="store_true",
                    help="new random tokens every step in both runs (as in training)")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--peer", help=argparse.SUPPRESS)  # internal: one PyTorch run, as JSON
    args = ap.parse_args()
    c = read_config(args.config, args.set)
    fpt = flops_per_token(c)
    if args.peer:
        try:
            r = run_torch(c, args, args.peer.endswith("-compile"), args.peer.startswith("bf16"))
        except ImportError as e:
            sys.exit(f"vs_pytorch: {e} (pip install torch transformers)")
        print("PEER_RESULT " + json.dumps(r), flush=True)
        return

    m = run_moet(args.moet, args.config, args)
    runs = [("moet", m)]
    bf16 = (args.precision or ("bf16" if args.device == "cuda" else "fp32")) == "bf16"
    # on the CPU the fp32 peer always runs; with --precision bf16 also the bf16 one
    variants = [False, True] if args.device == "cpu" and bf16 else [bf16]
    for v in variants:
        for comp in [False, True] if args.compile else [False]:
            t = peer_(args, v, comp)
            runs.append((t.pop("what"), t))

    peak = m["peak_gflops"]
    print(f"\nmodel: {args.config} {' '.join(args.set)}: L {c['L']} d_model {c['D']} heads "
          f"{c['H']} experts {c['E']} top-{c['k']} expert width {c['F']} vocab {c['Vpad']}; "
          f"{c['B']} x {c['T']} tokens per step; {fpt / 1e9:.3f} GFLOP per token")
    print(f"tokens: {'new every step' if args.vary_tokens else 'the same batch every step'}")
    print(f"device {args.device}, {args.threads} threads; MFU against "
          f"{peak:.1f} GFLOP/s ({m['peak_kind'] if args.device == 'cpu' else 'bf16 peak'})")
    mem = "peak device memory GiB" if args.device == "cuda" else "peak RSS MiB"
    print(f"\n| run | step time (median) s | tokens/s | MFU % | {mem} | moet / this |")
    print("|---|---|---|---|---|---|")
    for name, r in runs:
        mfu = r["tok"] * fpt / (peak * 1e9) * 100 if peak else float("nan")
        mm = r["dev"] if args.device == "cuda" else r["rss"]
        ratio = m["tok"] / r["tok"]
        print(f"| {name} | {r['step']:.3f} | {r['tok']:.1f} | {mfu:.1f} | "
              f"{mm:.1f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
