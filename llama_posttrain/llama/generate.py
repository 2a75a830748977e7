"""Batched sampling with a KV cache: prefill each prompt once, fan it out to K samples.

    python -m llama_posttrain.llama.generate --checkpoint DIR [--tokenizer FILE] --prompt "..." --samples K

The tokenizer defaults to the checkpoint folder's (llama.tokenizer.resolve_tokenizer); a model whose
vocabulary is not the shipped byte tokenizer's fails at start without one.

Prompts of different lengths are left-padded; pad slots get doc PAD_DOC and real tokens doc 0,
so no real token attends to them (the model's row rule). The prefill runs in chunks of positions whose
masks stay under PREFILL_MASK_ENTRIES (a whole long prompt's would take GiBs). Every row stops at its own stop token;
finished rows are dropped from the batch as they accumulate (checked every STOP_CHECK_EVERY steps),
so long and short samples don't pay for each other. The KV cache is preallocated and written in place;
sampling draws one uniform per row on the device (sample_categorical): no fp64, no host sync per step.
The decode step (decode_step) has the same shapes at every step, so `compile=True` compiles it once per
batch size and cache length; compiled, finished rows stay in the batch (dropping them changes the shapes).
On the CPU it takes ~7% off the benchmark's runs after a 20-100 s compile (experiments/bench/results/generate.md).
`compile="reduce-overhead"` (CUDA only) also captures the step as a CUDA graph, the KV cache's tensors marked
as static addresses (unmeasured: no GPU run yet). Past torch._dynamo's recompile_limit of graphs (distinct
batch sizes, cache lengths, sampling settings) a call decodes eagerly, with a warning, counted in
EAGER_FALLBACKS (a fullgraph compile past the limit would raise).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F
from torch import Tensor

from llama_posttrain.llama.kv_budget import cache_len
from llama_posttrain.llama.model import PAD_DOC, KVCache, Transformer, rope_cos_sin, rope_inv_freq

# Steps between host syncs that check which rows have stopped (a sync per step stalls an accelerator).
STOP_CHECK_EVERY = 8
# The prefill runs in chunks of prompt positions, each chunk's queries against the cache's filled slots, so
# that a chunk's dense mask (prompts x chunk x filled slots, and the attention's K-fold repeat of it, and
# its float form) holds at most this many query-key entries, and the activations a chunk's tokens. The
# whole prompt at once would be (64 prompts x 2048 x 2048) x 4 (GQA groups) x (1 + 2 bytes): 3 GiB.
PREFILL_MASK_ENTRIES = 2**23


def sample_next(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator=None,
    u: Tensor | None = None,
    overwrite: bool = False,
) -> Tensor:
    """logits (N, V) -> next token ids (N,). temperature 0 is greedy. No host sync, no fp64.
    u: the row's uniform draws (N, 1) in [0, 1), drawn from `generator` when not given.
    overwrite: the logits are the caller's scratch, the sampler may work in them (saves an N x V copy)."""
    if temperature == 0:
        return logits.argmax(-1)
    if u is None:
        u = torch.rand(logits.shape[0], 1, generator=generator, device=logits.device)
    if overwrite and logits.dtype == torch.float32:
        if temperature != 1:
            logits.div_(temperature)
    else:
        logits = logits.float() / temperature  # a new tensor: the filters and the sampler work on it in place
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits.masked_fill_(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return sample_categorical(logits, u=u)


def sample_categorical(logits: Tensor, generator=None, block: int = 256, u: Tensor | None = None) -> Tensor:
    """One draw per row from softmax(logits) (N, V), by inverse CDF in two levels; overwrites `logits`.

    One uniform per row, `u` (N, 1) in [0, 1) or drawn from `generator` (the Gumbel/exponential tricks
    need one per vocabulary entry: on a CPU drawing those 128k numbers costs as much as the vocabulary
    projection). A single fp32 cumsum over 128k entries would lose the small probabilities, so the
    uniform first picks a block of `block` entries by the blocks' cumulative masses, then an entry by
    the cumulative mass within that block: both sums are short and exact enough in fp32.
    """
    N, V = logits.shape
    if u is None:
        u = torch.rand(N, 1, generator=generator, device=logits.device)
    w = logits.sub_(logits.amax(-1, keepdim=True)).exp_()  # unnormalized probabilities, the largest 1
    if V % block:
        w = F.pad(w, (0, -V % block))  # zero-weight tail: a whole number of blocks
    blocks = w.view(N, -1, block)
    mass = blocks.sum(-1)  # (N, nb)
    cum = mass.cumsum(-1)
    u = u.to(w.dtype) * cum[:, -1:]
    b = torch.searchsorted(cum, _below(u, cum[:, -1:]), right=True)  # (N, 1) first block whose mass passes u
    inner = blocks.gather(1, b[:, :, None].expand(N, 1, block)).squeeze(1).cumsum(-1)  # (N, block)
    rest = (u - (cum.gather(1, b) - mass.gather(1, b))).clamp_(min=0)
    j = torch.searchsorted(inner, _below(rest, inner[:, -1:]), right=True)
    return (b * block + j).squeeze(1)


def _below(x: Tensor, total: Tensor) -> Tensor:
    """x kept strictly below total, so that searchsorted(right=True) lands on an entry of non-zero weight
    even when rounding puts x at the end of the cumulative sums."""
    return torch.minimum(x, torch.nextafter(total, torch.zeros_like(total)))


class DecodeCache:
    """The prefill's KVCache fanned out to `n` rows per prompt, for decoding with the same shapes at every
    step (gpt-fast's approach): a step's token is written at `slot`, a tensor rather than a Python int, and
    attention reads all max_len slots, those not yet written masked out. So a compiled step is compiled
    once per batch size and cache length, and a GPU could capture it as a graph. Each layer's k/v is a
    tensor of its own, written with an indexed assignment: torch.compile then writes it in place (a slice
    of one stacked buffer is copied whole by the compiled step, every layer, every step)."""

    def __init__(self, cache: KVCache, n: int):
        self.k = [k.repeat_interleave(n, dim=0) for k in cache.k]  # per layer (N, nkv, max_len, hd)
        self.v = [v.repeat_interleave(n, dim=0) for v in cache.v]
        max_len, device = cache.k.shape[3], cache.k.device
        self.slot = torch.tensor([cache.length], device=device)  # (1,) the slot this step writes
        self.slots = torch.arange(max_len, device=device)
        # Slots a decoded token may attend, besides being at or before its own slot: not padding
        # (the prefill wrote doc ids; decoded tokens are doc 0, as the prompts' real tokens).
        self.real = (cache.doc >= 0).repeat_interleave(n, dim=0)

    def mark_static(self) -> None:
        """For CUDA graphs: the step writes the k/v tensors in place, at addresses fixed for the call. Marked
        static, a graph may mutate them (else inductor skips the graph); guard=False: a new call's cache
        re-records the graph, it does not recompile the step."""
        for t in self.k + self.v:
            torch._dynamo.mark_static_address(t, guard=False)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write one step's k/v (B, nkv, 1, hd) at `slot`; return all max_len slots."""
        self.k[layer][:, :, self.slot] = k
        self.v[layer][:, :, self.slot] = v
        return self.k[layer], self.v[layer]

    def select(self, rows: Tensor) -> None:
        """Keep only `rows` (indices) of the batch, e.g. to drop finished samples (changes the shapes)."""
        self.k, self.v = [k[rows] for k in self.k], [v[rows] for v in self.v]
        self.real = self.real[rows]

    def advance(self) -> None:
        self.slot += 1


def decode_step(
    model: Transformer,
    tokens: Tensor,
    positions: Tensor,
    cache: DecodeCache,
    u: Tensor | None,
    temperature: float,
    top_k: int,
    top_p: float,
    inv_freq: Tensor,
    logits_out: Tensor | None = None,
) -> Tensor:
    """tokens (N,) at positions (N,), written at cache.slot -> the next tokens (N,), sampled with
    uniforms u (N, 1). No Python-int shapes or slices depend on the step: compilable once.
    logits_out: a (2 * N0, V) buffer (N0 >= N) for the logits and project_vocab's scratch, reused across
    steps (eager: each fresh 30+ MB allocation at a 128k vocabulary is a new mapping from the OS, page
    faults included)."""
    mask = (cache.real & (cache.slots <= cache.slot))[:, None, None, :]  # (N, 1, 1, max_len)
    cos, sin = rope_cos_sin(positions[:, None], inv_freq)
    h = model.tok_embeddings(tokens[:, None])  # (N, 1, dim)
    for i, layer in enumerate(model.layers):
        h = layer(h, cos, sin, mask, cache, i)
    h = model.norm(h)[:, 0]
    if logits_out is None:
        logits = F.linear(h, model.output_weight)
    else:
        logits = project_vocab(h, model.output_weight, logits_out)
    return sample_next(logits, temperature, top_k, top_p, u=u, overwrite=True)


def project_vocab(h: Tensor, weight: Tensor, out: Tensor) -> Tensor:
    """h (n, dim) -> logits (n, V), written into out[:n] where `out` is a (2 * rows, V) scratch.
    On the CPU it is computed as (weight @ h^T)^T, into the scratch's second half, then copied: with
    decode's few rows, BLAS runs this order 1.3-1.5x faster than h @ weight^T (dim 512, V 128256,
    n 32-64: 85 vs 113 ms at n 64, transpose copy included). Elsewhere, h @ weight^T directly."""
    n, V = h.shape[0], weight.shape[0]
    logits = out[:n]
    if h.device.type != "cpu":
        return torch.mm(h, weight.t(), out=logits)
    vt = torch.mm(weight, h.t(), out=out[out.shape[0] // 2 :].view(-1)[: V * n].view(V, n))
    return logits.copy_(vt.t())


_compiled_decode_step = None  # torch.compile(decode_step), made on first use
_graphed_decode_step = None  # the same with mode="reduce-overhead" (CUDA graphs)
COMPILE_MODES = (True, "default", "reduce-overhead")
# generate calls that decoded eagerly although compiled: the compiled step was past its recompile limit
EAGER_FALLBACKS = 0


def compiled_decode_step(mode: str | None = None):
    global _compiled_decode_step, _graphed_decode_step
    # dynamic=False: one specialized graph per (batch, cache length); row dropping is off when compiled.
    if mode == "reduce-overhead":
        if _graphed_decode_step is None:
            _graphed_decode_step = torch.compile(decode_step, dynamic=False, fullgraph=True, mode=mode)
        return _graphed_decode_step
    if _compiled_decode_step is None:
        _compiled_decode_step = torch.compile(decode_step, dynamic=False, fullgraph=True)
    return _compiled_decode_step


def _recompile_limit_errors() -> tuple:
    """What a fullgraph compile raises past torch._dynamo.config.recompile_limit (torch 2.11 on), if any."""
    import torch._dynamo.exc

    error = getattr(torch._dynamo.exc, "FailOnRecompileLimitHit", None)
    return (error,) if error is not None else ()


def prefill_chunk(num_prompts: int, prompt_len: int) -> int:
    """Prompt positions per prefill chunk: the most whose mask against the whole prompt (num_prompts x chunk
    x prompt_len) holds at most PREFILL_MASK_ENTRIES, at least 1; the whole prompt when it fits."""
    return min(prompt_len, max(1, PREFILL_MASK_ENTRIES // (num_prompts * prompt_len)))


@torch.no_grad()
def generate(
    model: Transformer,
    prompts: list[list[int]],
    num_samples: int = 1,
    max_new_tokens: int = 64,
    stop_ids=(),
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    pad_id: int = 0,
    generator: torch.Generator | None = None,
    compile: bool | str = False,
) -> list[list[list[int]]]:
    """-> out[p][k]: the tokens sampled for prompt p, sample k (ending with a stop id if one was hit).

    compile: run the decode step through torch.compile (compiled once per batch size and cache length;
    finished rows then stay in the batch until all are done, so the shapes stay the same). True or
    "default": torch.compile's default mode; "reduce-overhead": CUDA graphs too (a CUDA model only).
    """
    if model.head != "lm":
        raise ValueError("generate needs a model with the LM head")
    if compile not in (False, *COMPILE_MODES):
        raise ValueError(f"compile must be False, True, 'default' or 'reduce-overhead', got {compile!r}")
    graphs = compile == "reduce-overhead"
    if graphs and model.tok_embeddings.weight.device.type != "cuda":
        raise ValueError(
            f"compile='reduce-overhead' captures CUDA graphs: the model must be on a CUDA device, it is on "
            f"{model.tok_embeddings.weight.device}"
        )
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    V = model.config.vocab_size
    for i, p in enumerate(prompts):  # checked here, on the host: the model checks ids only on the CPU
        bad = next((t for t in p if not 0 <= t < V), None)
        if bad is not None:
            raise ValueError(f"prompt {i}: token id {bad} is out of range for vocab_size {V}")
    device = model.tok_embeddings.weight.device
    P, K, L = len(prompts), num_samples, max(len(p) for p in prompts)
    if L + max_new_tokens > model.config.max_seq_len:
        raise ValueError(
            f"prompt ({L}) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len {model.config.max_seq_len}"
        )
    max_len = cache_len(model.config, L, max_new_tokens, compile)

    tokens = torch.full((P, L), pad_id, dtype=torch.long)
    doc = torch.full((P, L), PAD_DOC, dtype=torch.long)
    positions = torch.zeros((P, L), dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, L - len(p) :] = torch.tensor(p)
        doc[i, L - len(p) :] = 0
        positions[i, L - len(p) :] = torch.arange(len(p))
    tokens, doc, positions = tokens.to(device), doc.to(device), positions.to(device)

    # Prefill once per prompt, then fan the cache out to K rows per prompt. The prompts' mask keeps real
    # tokens off the pad slots; dense, as every step's that reads the cache (decode_step), built by the
    # trunk from the cache's ids for each chunk of positions: (P, 1, chunk, filled slots), never (P, 1, L, L).
    cache = KVCache(model.config, P, max_len, dtype=model.tok_embeddings.weight.dtype, device=device)
    chunk = prefill_chunk(P, L)
    for a in range(0, L, chunk):
        part = slice(a, a + chunk)
        h = model.trunk(tokens[:, part], positions[:, part], doc_ids=doc[:, part], cache=cache)
    h = h[:, -1]  # (P, dim)
    logits = F.linear(h, model.output_weight).repeat_interleave(K, dim=0)  # (P*K, V)
    cache = DecodeCache(cache, K)
    if graphs:
        cache.mark_static()
    next_pos = torch.tensor([len(p) for p in prompts], device=device).repeat_interleave(K)  # (P*K,)
    inv_freq = rope_inv_freq(model.config, device)
    step_fn = compiled_decode_step("reduce-overhead" if graphs else None) if compile else decode_step
    limit_hit = _recompile_limit_errors() if compile else ()
    # compiled: inductor plans its own buffers; eager: the logits and project_vocab's scratch
    logits_buf = None if compile else torch.empty(2 * P * K, logits.shape[1], dtype=logits.dtype, device=device)

    def uniforms(n):  # drawn outside the (compiled) step: a torch.Generator cannot enter a compiled graph
        return torch.rand(n, 1, generator=generator, device=device) if temperature else None

    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    rows = torch.arange(P * K, device=device)  # original row of each live batch row
    finished = torch.zeros(P * K, dtype=torch.bool, device=device)
    # Sampled ids stay on the device (-1: not sampled, the row had finished): one transfer at the end,
    # and one host sync every STOP_CHECK_EVERY steps (how many rows are done). Between checks a finished
    # row keeps decoding (its tokens are masked out): a few wasted rows instead of a stall per step.
    sampled = torch.full((P * K, max_new_tokens), -1, dtype=torch.long, device=device)
    nxt = sample_next(logits, temperature, top_k, top_p, u=uniforms(P * K), overwrite=True)  # (N,)
    for step in range(max_new_tokens):
        sampled[rows, step] = nxt.masked_fill(finished, -1)
        finished |= torch.isin(nxt, stop)
        if step == max_new_tokens - 1:
            break
        if (step + 1) % STOP_CHECK_EVERY == 0:
            done = int(finished.sum())
            if done == len(rows):
                break
            if not compile and done * 4 >= len(rows):  # drop finished rows once they are a quarter of the batch
                keep = (~finished).nonzero().squeeze(-1)
                cache.select(keep)
                rows, nxt, next_pos, finished = rows[keep], nxt[keep], next_pos[keep], finished[keep]
        u = uniforms(len(rows))
        try:  # only a call's first compiled step can compile: its shapes are the same at every step
            nxt = step_fn(model, nxt, next_pos, cache, u, temperature, top_k, top_p, inv_freq, logits_buf)
        except limit_hit:
            step_fn = decode_step
            nxt = step_fn(model, nxt, next_pos, cache, u, temperature, top_k, top_p, inv_freq, logits_buf)
            eager_fallback(len(rows), cache.slots.numel())
        cache.advance()
        next_pos += 1
    out = [[t for t in row if t >= 0] for row in sampled.tolist()]
    return [out[p * K : (p + 1) * K] for p in range(P)]


def eager_fallback(rows: int, slots: int) -> None:
    """Count and print a compiled call that decodes eagerly: its shape is past the compiled step's graphs."""
    global EAGER_FALLBACKS
    EAGER_FALLBACKS += 1
    limit = torch._dynamo.config.recompile_limit
    print(
        f"warning: generate: the compiled decode step already has torch._dynamo's recompile_limit ({limit}) of "
        f"graphs (batch sizes x cache lengths x sampling settings); this call ({rows} rows x {slots} slots) "
        f"decodes eagerly (eager calls so far in this process: {EAGER_FALLBACKS}). Fewer shapes (full batches of "
        "prompts) or a higher torch._dynamo.config.recompile_limit avoid it",
        file=sys.stderr,
        flush=True,
    )


def main(argv=None):
    from llama_posttrain.llama.chat import TEMPLATES, ChatFormat, resolve_chat_template
    from llama_posttrain.llama.checkpoint import CheckpointError, load_model, read_config
    from llama_posttrain.llama.config import get_preset
    from llama_posttrain.llama.tokenizer import resolve_tokenizer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="native, HF or Meta checkpoint directory")
    ap.add_argument("--preset", help="a randomly initialized model of this preset instead of a checkpoint")
    ap.add_argument(
        "--tokenizer",
        help="tokenizer file (or a model folder holding one); default: the checkpoint folder's, else the shipped "
        "byte tokenizer if the model's vocabulary is its 512 ids",
    )
    ap.add_argument("--chat-template", choices=TEMPLATES, help="default: the checkpoint folder's, else llama3")
    ap.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--raw", action="store_true", help="plain text prompt instead of a user turn")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compile", action="store_true", help="torch.compile the decode step (pays on repeated calls)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    if bool(args.checkpoint) == bool(args.preset):
        ap.error("give exactly one of --checkpoint and --preset")

    torch.manual_seed(args.seed)
    try:
        config = read_config(args.checkpoint)[0] if args.checkpoint else get_preset(args.preset)
        tok = resolve_tokenizer(args.tokenizer, args.checkpoint, config.vocab_size)  # before the (long) load
        chat = ChatFormat(tok, resolve_chat_template(args.chat_template, args.checkpoint))
        model = load_model(args.checkpoint, device=args.device) if args.checkpoint else Transformer(config)
    except (CheckpointError, ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    model = model.to(args.device).eval()
    prompts = [
        tok.encode(p, bos=True) if args.raw else chat.encode_dialog([{"role": "user", "content": p}], True).tokens
        for p in args.prompt
    ]
    gen = torch.Generator(args.device).manual_seed(args.seed)
    t0 = time.perf_counter()
    out = generate(
        model,
        prompts,
        args.samples,
        args.max_new_tokens,
        chat.stop_ids,
        args.temperature,
        args.top_k,
        args.top_p,
        tok.pad_id,
        gen,
        compile=args.compile,
    )
    dt = time.perf_counter() - t0
    n = sum(len(s) for samples in out for s in samples)
    for prompt, samples in zip(args.prompt, out):
        print(f"### {prompt!r}")
        for k, s in enumerate(samples):
            print(f"[{k}] {decode_sample(tok, s)!r}")
    print(f"{n} tokens in {dt:.2f}s ({n / dt:.0f} tokens/s)")


def decode_sample(tokenizer, ids: list[int]) -> str:
    """A sample's text: its ids decoded without the stop token(s) that ended it."""
    stop = set(tokenizer.stop_ids)
    return tokenizer.decode([t for t in ids if t not in stop])


if __name__ == "__main__":
    main()
