#!/usr/bin/env python3
"""Independent check of tests/fixtures/olmoe_*.h5 (made by make_olmoe_fixtures.py).

Uses only h5py and numpy (no torch, no transformers): re-reads each fixture, checks the layout
(root attributes, the INI config, every /model and /reference/grad name, shape and dtype, input ids
below vocab_size), re-computes the forward pass and the losses of ARCHITECTURE §3 in float64 numpy
from the stored float32 weights and compares them with the stored logits / ce / lb / z / loss, and
checks the stored gradients by central finite differences of that numpy loss on a few elements of
every tensor (the largest-gradient element and two random ones).

    python3 tests/reference/check_olmoe_fixtures.py [fixture.h5 ...]   # default: all olmoe_*.h5
"""

import configparser
import glob
import math
import os
import sys

import h5py
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def expected_shapes(cfg):
    D, L, E, F_ = cfg["d_model"], cfg["n_layers"], cfg["n_experts"], cfg["expert_d_ff"]
    V = (cfg["vocab_size"] + 127) // 128 * 128
    s = {"model.embed_tokens.weight": (V, D)}
    for l in range(L):
        p = f"model.layers.{l}."
        s[p + "input_layernorm.weight"] = (D,)
        for w in ("q_proj", "k_proj", "v_proj", "o_proj"):
            s[p + f"self_attn.{w}.weight"] = (D, D)
        s[p + "self_attn.q_norm.weight"] = (D,)
        s[p + "self_attn.k_norm.weight"] = (D,)
        s[p + "post_attention_layernorm.weight"] = (D,)
        s[p + "mlp.gate.weight"] = (E, D)
        s[p + "mlp.experts.gate_proj.weight"] = (E, F_, D)
        s[p + "mlp.experts.up_proj.weight"] = (E, F_, D)
        s[p + "mlp.experts.down_proj.weight"] = (E, D, F_)
    s["model.norm.weight"] = (D,)
    s["lm_head.weight"] = (V, D)
    return s


def parse_ini(text):
    cp = configparser.ConfigParser()
    cp.read_string(text)
    assert cp.sections() == ["model", "moe", "train", "data"], cp.sections()
    keys = {
        "model": ["d_model", "n_layers", "n_heads", "vocab_size", "max_seq_len", "rope_theta", "norm_eps"],
        "moe": ["n_experts", "top_k", "expert_d_ff", "norm_topk_prob", "lb_coef", "z_coef"],
        "train": ["seq_len", "micro_batch", "global_batch", "max_steps"],
    }
    cfg = {}
    for sec, ks in keys.items():
        assert list(cp[sec].keys()) == ks, (sec, list(cp[sec].keys()))
        for k in ks:
            v = cp[sec][k]
            if k == "norm_topk_prob":
                assert v in ("true", "false")
                cfg[k] = v == "true"
            elif k in ("rope_theta", "norm_eps", "lb_coef", "z_coef"):
                cfg[k] = float(v)
            else:
                cfg[k] = int(v)
    return cfg


def forward_loss(cfg, W, ids):
    """float64 numpy forward + §3 losses. Returns logits, dict of losses, per-layer top-k gaps."""
    B, T = ids.shape
    D, H, E, k = cfg["d_model"], cfg["n_heads"], cfg["n_experts"], cfg["top_k"]
    hd, N, eps = D // H, B * T, cfg["norm_eps"]

    def rms(x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w

    half = hd // 2
    theta = np.arange(T)[:, None] * cfg["rope_theta"] ** (-(2.0 * np.arange(half)) / hd)[None, :]
    c, s = np.cos(theta), np.sin(theta)

    def rope(x):  # x [B, T, H, hd]
        a, b = x[..., :half], x[..., half:]
        cc, ss = c[None, :, None, :], s[None, :, None, :]
        return np.concatenate([a * cc - b * ss, b * cc + a * ss], axis=-1)

    mask = np.triu(np.ones((T, T), dtype=bool), 1)
    x = W["model.embed_tokens.weight"][ids]
    lbs, zs, gaps = [], [], []
    for l in range(cfg["n_layers"]):
        p = f"model.layers.{l}."
        h = rms(x, W[p + "input_layernorm.weight"])
        q = rms(h @ W[p + "self_attn.q_proj.weight"].T, W[p + "self_attn.q_norm.weight"]).reshape(B, T, H, hd)
        kk = rms(h @ W[p + "self_attn.k_proj.weight"].T, W[p + "self_attn.k_norm.weight"]).reshape(B, T, H, hd)
        v = (h @ W[p + "self_attn.v_proj.weight"].T).reshape(B, T, H, hd)
        q, kk = rope(q), rope(kk)
        sc = np.einsum("bthd,bshd->bhts", q, kk) / math.sqrt(hd)
        sc = np.where(mask[None, None], -np.inf, sc)
        sc = np.exp(sc - sc.max(-1, keepdims=True))
        sc /= sc.sum(-1, keepdims=True)
        o = np.einsum("bhts,bshd->bthd", sc, v).reshape(B, T, D)
        x = x + o @ W[p + "self_attn.o_proj.weight"].T
        h = rms(x, W[p + "post_attention_layernorm.weight"]).reshape(N, D)
        rl = h @ W[p + "mlp.gate.weight"].T  # [N, E]
        m = rl.max(-1, keepdims=True)
        lse = (m + np.log(np.exp(rl - m).sum(-1, keepdims=True)))[:, 0]
        pr = np.exp(rl - lse[:, None])
        order = np.argsort(-pr, axis=-1, kind="stable")
        top = order[:, :k]
        if k < E:
            ps = np.take_along_axis(pr, order, -1)
            gaps.append((ps[:, k - 1] - ps[:, k]).min())
        wts = np.take_along_axis(pr, top, -1)
        if cfg["norm_topk_prob"]:
            wts = wts / wts.sum(-1, keepdims=True)
        moe = np.zeros((N, D))
        for n in range(N):
            for j in range(k):
                e = top[n, j]
                g = W[p + "mlp.experts.gate_proj.weight"][e] @ h[n]
                u = W[p + "mlp.experts.up_proj.weight"][e] @ h[n]
                moe[n] += wts[n, j] * (W[p + "mlp.experts.down_proj.weight"][e] @ (g / (1 + np.exp(-g)) * u))
        x = x + moe.reshape(B, T, D)
        f = np.bincount(top.reshape(-1), minlength=E) / (N * k)
        lbs.append(E * np.sum(f * pr.mean(0)))
        zs.append(np.mean(lse ** 2))
    x = rms(x, W["model.norm.weight"])
    logits = x @ W["lm_head.weight"].T
    lg = logits[:, :-1].reshape(-1, logits.shape[-1])
    tg = ids[:, 1:].reshape(-1)
    m = lg.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(lg - m).sum(-1, keepdims=True)))[:, 0]
    ce = np.mean(lse - lg[np.arange(len(tg)), tg])
    lb, z = np.mean(lbs), np.mean(zs)
    loss = ce + cfg["lb_coef"] * lb + cfg["z_coef"] * z
    return logits, dict(ce=ce, lb=lb, z=z, loss=loss), gaps


def check(path, rng):
    name = os.path.basename(path)
    with h5py.File(path, "r") as f:
        a = f.attrs
        assert a["format"] == "moet-checkpoint" and int(a["format_version"]) == 1
        assert a["step"].dtype == np.int64 and a["step"] == 0 and a["tokens_seen"] == 0
        assert isinstance(a["created"], str) and "T" in a["created"]
        cfg = parse_ini(a["config"])
        assert cfg["seq_len"] == cfg["max_seq_len"] and cfg["micro_batch"] == cfg["global_batch"]
        shapes = expected_shapes(cfg)
        assert set(f.keys()) == {"model", "reference"}, list(f.keys())
        assert sorted(f["model"].keys()) == sorted(shapes), sorted(set(f["model"].keys()) ^ set(shapes))
        assert sorted(f["reference/grad"].keys()) == sorted(shapes)
        W, G = {}, {}
        for n, shp in shapes.items():
            for grp, dst in (("model", W), ("reference/grad", G)):
                d = f[grp][n]
                assert d.shape == shp and d.dtype == np.float32, (grp, n, d.shape, d.dtype)
                dst[n] = d[()].astype(np.float64)
                assert np.all(np.isfinite(dst[n]))
        r = f["reference"]
        ids = r["input_ids"][()]
        B, T = cfg["micro_batch"], cfg["seq_len"]
        V = shapes["lm_head.weight"][0]
        assert ids.dtype == np.int32 and ids.shape == (B, T)
        assert ids.min() >= 0 and ids.max() < cfg["vocab_size"]
        assert r["logits"].dtype == np.float32 and r["logits"].shape == (B, T, V)
        ref_logits = r["logits"][()].astype(np.float64)
        ref = {}
        for key in ("ce", "lb", "z", "loss"):
            assert r[key].dtype == np.float64 and r[key].shape == (), key
            ref[key] = float(r[key][()])
        for key in ("torch_version", "transformers_version", "description"):
            assert isinstance(r.attrs[key], str) and r.attrs[key]
        desc = r.attrs["description"]

    assert abs(ref["loss"] - (ref["ce"] + cfg["lb_coef"] * ref["lb"] + cfg["z_coef"] * ref["z"])) < 1e-12
    ids = ids.astype(np.int64)
    logits, L, gaps = forward_loss(cfg, W, ids)
    e_log = np.abs(logits - ref_logits).max() / np.abs(ref_logits).max()
    assert e_log < 1e-6, e_log
    for key in ref:
        assert abs(L[key] - ref[key]) <= 1e-10 * max(1.0, abs(ref[key])), (key, L[key], ref[key])
    if gaps:
        assert min(gaps) > 1e-3, min(gaps)
    # padded vocabulary rows: never looked up (zero embedding grad), but in the softmax (lm_head grad)
    nv = cfg["vocab_size"]
    assert np.all(G["model.embed_tokens.weight"][nv:] == 0)
    assert np.abs(G["lm_head.weight"][nv:]).max() > 0

    # finite differences of the numpy loss vs the stored gradient
    worst, n_fd = 0.0, 0
    for n in shapes:
        g = G[n]
        flat = [int(np.argmax(np.abs(g)))]
        cand = np.flatnonzero(g) if n == "model.embed_tokens.weight" else np.arange(g.size)
        flat += [int(i) for i in rng.choice(cand, size=2, replace=False)]
        for i in flat:
            idx = np.unravel_index(i, g.shape)
            h = 1e-5 * max(1.0, abs(W[n][idx]))
            w0 = W[n][idx]
            W[n][idx] = w0 + h
            lp = forward_loss(cfg, W, ids)[1]["loss"]
            W[n][idx] = w0 - h
            lm = forward_loss(cfg, W, ids)[1]["loss"]
            W[n][idx] = w0
            fd = (lp - lm) / (2 * h)
            err = abs(fd - g[idx]) / (abs(g[idx]) + 1e-4 * np.abs(g).max() + 1e-9)
            worst = max(worst, err)
            n_fd += 1
            assert err < 1e-4, (n, idx, fd, g[idx])
    print(f"{name}: OK [{desc}] {len(shapes)} tensors, ce {ref['ce']:.10g} lb {ref['lb']:.10g} "
          f"z {ref['z']:.10g} loss {ref['loss']:.10g}; numpy logits rel err {e_log:.1e}; "
          f"{n_fd} finite-difference grads, worst rel err {worst:.1e}")


def main():
    paths = sys.argv[1:] or sorted(glob.glob(os.path.join(HERE, "..", "fixtures", "olmoe_*.h5")))
    assert paths, "no fixtures found"
    rng = np.random.default_rng(0)
    for p in paths:
        check(p, rng)


if __name__ == "__main__":
    main()
