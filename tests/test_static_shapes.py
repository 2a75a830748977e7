"""Static shapes (train.shape_buckets): micro-batches of a few (B, T) shapes, each compiled once.

The loader pads every micro-batch to (rows per micro-batch, a bucket of T), the same on every rank;
the padding rows change no loss, count, gradient or FLOP count; compiled blocks make one graph per
shape, at the first micro-batch of that shape, and none with dynamic sizes.
"""

import random
from pathlib import Path

import pytest
import torch
from conftest import random_model

from llama_posttrain.data.loader import DataLoader
from llama_posttrain.data.rows import Example, Seq, Target, bucket_lengths, build_group, collate, rows_per_microbatch
from llama_posttrain.llama import ModelConfig
from llama_posttrain.llama.chat import EncodedDialog
from llama_posttrain.llama.model import PAD_DOC

VOCAB = 64
CONFIG = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, vocab_size=VOCAB, max_seq_len=512)


def sft_example(rng: random.Random, n: int) -> Example:
    tokens = [rng.randrange(1, VOCAB) for _ in range(n)]
    targets = [Target(i - 1, tokens[i], 0, False) for i in range(1, n) if i == n - 1 or rng.random() < 0.7]
    return Example(tokens, list(range(n)), [0] * n, targets, [Seq(n - 1, 0)])


def preference_example(rng: random.Random, responses: int) -> Example:
    """[prompt][responses in a shuffled order]; the last token of each response a formatting token."""

    def dialog(n, target):
        return EncodedDialog([rng.randrange(1, VOCAB) for _ in range(n)], [target] * n, [i == n - 1 for i in range(n)])

    prompt = dialog(rng.randrange(3, 30), False)
    order = rng.sample(range(responses), responses)
    return build_group(prompt, [dialog(rng.randrange(2, 40), True) for _ in range(responses)], order)


def varied(kind: str, count: int, seed: int = 0) -> list[Example]:
    """Lengths from a few tokens to a whole row, so that steps fall in several buckets."""
    rng = random.Random(seed)
    out = []
    for uid in range(count):
        if kind == "sft":
            ex = sft_example(
                rng, rng.choice(3 * [rng.randrange(3, 30)] + [rng.randrange(30, 120), rng.randrange(3, 250)])
            )
        else:
            ex = preference_example(rng, 2 if kind == "dpo" else rng.randrange(2, 4))
        ex.uid = uid
        out.append(ex)
    return out


def loader(examples, shape_buckets: int, rank: int = 0, world_size: int = 1, **kw) -> DataLoader:
    kw = {"batch_size": 6, "max_len": 256, "tokens_per_microbatch": 512, "seed": 1, **kw}
    return DataLoader(examples, rank=rank, world_size=world_size, shape_buckets=shape_buckets, **kw)


def test_bucket_lengths_are_multiples_of_the_step_then_doubling_up_to_a_full_row():
    assert bucket_lengths(4096, 128) == [128, 256, 384, 512, 640, 768, 896, 1024, 2048, 4096]  # the documented rule
    for max_len in (60, 100, 128, 129, 1000, 2048, 3000, 8192, 131072):
        for step in (8, 64, 128):
            *below, top = bucket_lengths(max_len, step)
            assert top == -(-max_len // 8) * 8  # a full row, as without buckets
            assert all(t % step == 0 for t in below) and below == sorted(set(below)) and all(t < top for t in below)
            assert below[:1] == ([step] if step < top else [])
            for a, b in zip(below, below[1:]):
                assert b == (a + step if a < 8 * step else 2 * a)
            if below:  # the top is the next length, or closer
                assert top - below[-1] <= (step if below[-1] < 8 * step else below[-1])


@pytest.mark.parametrize("kind, batch_size", [("sft", 6), ("rm", 9)])
def test_every_micro_batch_of_every_rank_has_a_static_shape_the_same_on_all_ranks(kind, batch_size):
    examples = [ex for ex in varied(kind, 160) if len(ex) <= 128]
    world, kw = 3, {"batch_size": batch_size, "max_len": 128, "tokens_per_microbatch": 256}
    B, allowed = rows_per_microbatch(128, 256), set(bucket_lengths(128, 32))
    ranks = [loader(examples, 32, r, world, **kw) for r in range(world)]
    free = [loader(examples, 0, r, world, **kw) for r in range(world)]  # the default: each its own shape
    seen, padding_rows, empty = set(), 0, 0
    for step in range(len(examples) // batch_size):
        steps = [ld.build_step(0, step) for ld in ranks]
        olds = [ld.build_step(0, step) for ld in free]
        shapes = [[tuple(mb.tokens.shape) for mb in s.micro_batches] for s in steps]
        assert all(s == shapes[0] for s in shapes)  # every rank the same shapes in the same order
        for i, (B_i, T_i) in enumerate(shapes[0]):
            longest = max(int((s.micro_batches[i].doc_ids >= 0).sum(1).max()) for s in steps)  # over all ranks
            assert B_i == B and T_i in allowed and T_i == min(t for t in allowed if t >= longest)
            seen.add(T_i)
        for new, old in zip(steps, olds):
            assert (new.num_targets, new.num_pairs, new.num_chosen_targets) == (
                old.num_targets, old.num_pairs, old.num_chosen_targets,
            )  # fmt: skip
            assert len(new.micro_batches) == len(old.micro_batches)
            for a, b in zip(new.micro_batches, old.micro_batches):
                same_rows(a, b)
                padding_rows += int((a.doc_ids < 0).all(1).sum())
                empty += int((a.doc_ids < 0).all())
    assert len(seen) >= 3 and padding_rows > 0  # the data spans several buckets, and rows are padded
    assert empty > 0 or kind == "sft"  # the RM steps leave a rank without data for a micro-batch


def same_rows(padded, plain) -> None:
    """`padded` holds `plain`'s rows at their top-left, padding everywhere else, and the same targets
    and sequences at the same (row, column)."""
    T, (b, t) = padded.tokens.shape[1], plain.tokens.shape
    if not (plain.doc_ids >= 0).any():  # an empty micro-batch: (1, 8) of padding
        b = 0
    for name in ("tokens", "positions", "doc_ids", "branch_ids"):
        assert torch.equal(getattr(padded, name)[:b, :t], getattr(plain, name)[:b, :t])
    assert (padded.doc_ids[b:] == PAD_DOC).all() and (padded.doc_ids[:, t:] == PAD_DOC).all()
    for name, index in (("target_hidden_index", "target"), ("seq_score_index", "seq")):
        p, q = getattr(padded, name), getattr(plain, name)
        assert torch.equal(torch.stack([p // T, p % T]), torch.stack([q // t, q % t])), index
    for name in ("target_token", "target_seq", "target_format", "seq_group", "seq_rank", "group_uid"):
        assert torch.equal(getattr(padded, name), getattr(plain, name))


def test_shape_buckets_0_keeps_the_packed_rows_and_the_longest_row_rounded_up_to_8():
    """The default (train.compile off): the shapes, so the results, of before static shapes."""
    examples = varied("sft", 60)
    for step in loader(examples, 0).eval_steps():
        for mb in step.micro_batches:
            real = (mb.doc_ids >= 0).sum(1)
            assert mb.tokens.shape == (len(real), -(-int(real.max()) // 8) * 8) and (real > 0).all()


def test_collate_pads_to_a_given_shape_and_refuses_one_too_small():
    ex = sft_example(random.Random(0), 20)
    batch = collate([[ex]], shape=(3, 32))
    assert batch.tokens.shape == (3, 32) and int((batch.doc_ids >= 0).sum()) == 20
    with pytest.raises(ValueError, match="do not fit"):
        collate([[ex]], shape=(1, 16))
    with pytest.raises(ValueError, match="do not fit"):
        collate([[ex], [ex]], shape=(1, 32))


# ----------------------------------------------------------------------------- padding changes nothing


def objective(kind: str, model, reference=None):
    if kind == "sft":
        from llama_posttrain.train.sft_objective import make_objective

        return make_objective(model, "torch")
    if kind == "rm":
        from llama_posttrain.train.rm_objective import make_objective

        return make_objective(model, margin=None)
    from llama_posttrain.train.dpo import DPOSection
    from llama_posttrain.train.dpo_objective import make_objective
    from llama_posttrain.train.targets import LiveReference

    return make_objective(model, LiveReference(reference, "torch"), DPOSection(), "torch")


def step_loss_and_grads(kind: str, model, step, reference=None):
    """The loop's step (llama_posttrain/train/loop.py Trainer.train_step): every micro-batch's loss, summed, backward;
    -> the loss, the metric sums over the micro-batches, the gradients."""
    model.zero_grad(set_to_none=True)
    obj, loss, sums = objective(kind, model, reference), 0.0, {}
    for mb in step.micro_batches:
        part, part_sums = obj.loss(mb, step)
        part.backward()
        loss = loss + part.detach()
        for k, v in part_sums.items():  # summed, or combined by max / min (the ranking loss's reward_max, _min)
            how = (getattr(obj, "extrema", None) or {}).get(k)
            v = v.detach().double()
            sums[k] = v if k not in sums else getattr(torch, how)(sums[k], v) if how else sums[k] + v
    return loss, sums, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["sft", "rm", "dpo"])
def test_padding_rows_change_no_loss_sum_or_gradient(kind):
    """A step of static shapes (padded rows and columns) against the same step of packed shapes in
    float64: equal to float64 rounding in float64, and to float32 rounding in float32."""
    from llama_posttrain.train.flops import step_flops

    head = "reward" if kind == "rm" else "lm"
    model64 = random_model(CONFIG, head=head).double().train()
    reference = random_model(CONFIG, seed=1).double() if kind == "dpo" else None
    examples, kw = varied(kind, 60, seed=3), {"batch_size": 8}
    data = loader(examples, 64, **kw)
    i = next(i for i in range(7) if any((mb.doc_ids < 0).all(1).any() for mb in data.build_step(0, i).micro_batches))
    plain, padded = loader(examples, 0, **kw).build_step(0, i), data.build_step(0, i)  # a step with a padding row
    padded.micro_batches.append(collate([[]], shape=data.shapes[0]))  # and an empty micro-batch (a rank without data)
    assert all(tuple(mb.tokens.shape) in data.shapes for mb in padded.micro_batches)
    assert [mb.tokens.shape for mb in plain.micro_batches] != [mb.tokens.shape for mb in padded.micro_batches[:-1]]
    want_loss, want_sums, want_grads = step_loss_and_grads(kind, model64, plain, reference)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-5)):
        model = random_model(CONFIG, head=head).to(dtype).train()
        ref = reference.to(dtype) if reference is not None else None
        loss, sums, grads = step_loss_and_grads(kind, model, padded, ref)
        assert abs(float(loss) - float(want_loss)) <= tol * max(1.0, abs(float(want_loss)))
        assert sums.keys() == want_sums.keys()
        for k in sums:
            torch.testing.assert_close(sums[k], want_sums[k], rtol=tol, atol=tol, msg=k)
        assert grads.keys() == want_grads.keys()
        for n in grads:
            torch.testing.assert_close(grads[n].double(), want_grads[n], rtol=tol, atol=tol, msg=n)
    if head == "lm":  # what the step ran, pads excluded (the reward head's term counts every position)
        assert step_flops(CONFIG, head, padded.micro_batches) == step_flops(CONFIG, head, plain.micro_batches)


def test_dpo_reference_table_is_the_reference_log_probs_of_the_padded_rows():
    from llama_posttrain.train.targets import dpo_logps, model_logps, reference_table

    reference = random_model(CONFIG, seed=1).double()
    examples = varied("dpo", 30, seed=4)
    padded = loader(examples, 128, batch_size=7, drop_last=False, shuffle=False)
    table = reference_table(reference, padded, "torch", True, torch.device("cpu"))
    want = torch.zeros(len(examples), 2, dtype=torch.float64)
    with torch.no_grad():
        for step in padded.eval_steps():
            for mb in step.micro_batches:
                assert tuple(mb.tokens.shape) in padded.shapes
                chosen, rejected = dpo_logps(model_logps(reference, mb, "torch"), mb)
                want[mb.group_uid] = torch.stack([chosen, rejected], -1)
    torch.testing.assert_close(table.double(), want, rtol=1e-6, atol=1e-6)  # the table is fp32


# ----------------------------------------------------------------------------- compiled: one graph per shape


def compiled_run(shape_buckets: int, steps: int = 20):
    """`steps` SFT steps of a 1-rank FSDP model whose blocks are compiled (llama_posttrain/train/distributed.py
    `parallelize`) with a backend that records each graph dynamo makes and runs it eagerly.
    -> (the shape of each micro-batch, the graphs made before it ran, each graph's input sizes)."""
    from llama_posttrain.losses import sft
    from llama_posttrain.train.distributed import init_distributed, parallelize
    from llama_posttrain.train.targets import model_logps

    graphs = []

    def backend(gm, example_inputs):  # the sizes of each input as dynamo traced it: ints, or SymInts if dynamic
        values = [n.meta["example_value"] for n in gm.graph.nodes if n.op == "placeholder"]
        graphs.append([tuple(v.shape) if isinstance(v, torch.Tensor) else (v,) for v in values])
        return gm.forward

    torch._dynamo.reset()
    examples = varied("sft", 200, seed=5)
    data = loader(examples, shape_buckets)
    model = random_model(CONFIG).train()
    parallelize(model, init_distributed(), compile=True, static_shapes=len(data.shapes), compile_backend=backend)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    shapes, made = [], []
    batches = iter(data)
    for _ in range(steps):
        step = next(batches)
        for mb in step.micro_batches:
            made.append(len(graphs))
            shapes.append(tuple(mb.tokens.shape))
            loss, _ = sft.sft_loss(model_logps(model, mb, "torch"), step.num_targets)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    made.append(len(graphs))
    torch._dynamo.reset()
    return shapes, made, graphs


def test_compiled_blocks_make_one_static_graph_per_shape_at_its_first_micro_batch(one_rank):
    """20 steps on examples of 3..250 tokens: a graph per (B, T) seen, shared by the blocks, made at
    the first micro-batch of that shape and never again; every size in it a number, none symbolic.
    The recompile limit, lowered here to 1, is raised to hold every shape (none runs eagerly)."""
    with torch._dynamo.config.patch(recompile_limit=1):  # torch's own patch: it restores the entry it changed
        shapes, made, graphs = compiled_run(shape_buckets=64)
    distinct = list(dict.fromkeys(shapes))  # in order of first appearance
    assert len(distinct) >= 3 and all(T in bucket_lengths(256, 64) for _, T in distinct)
    assert len(graphs) == len(distinct)  # once per shape (the blocks share TransformerBlock.forward)
    for i, shape in enumerate(shapes):
        first = shapes.index(shape) == i
        assert made[i + 1] - made[i] == (1 if first else 0), f"micro-batch {i} {shape}: {made[i + 1] - made[i]} graphs"
    for sizes, (B, T) in zip(graphs, distinct):
        assert (B, T, CONFIG.dim) in sizes  # the block's input x, at its static shape
        assert all(isinstance(s, int) for size in sizes for s in size)


def test_block_mask_compiles_twice_over_all_buckets(monkeypatch):
    """FlexAttention's create_block_mask (compiled, torch's dynamic default) on the bucketed shapes: a
    static graph for the first, then one graph with dynamic sizes for every other, not one per T."""
    from torch.nn.attention.flex_attention import create_block_mask

    import llama_posttrain.llama.model as llama_model

    frames = []

    def backend(gm, example_inputs):
        frames.append(gm)
        return gm.forward

    torch._dynamo.reset()
    monkeypatch.setattr(llama_model, "_compiled_create_block_mask", torch.compile(create_block_mask, backend=backend))
    for T in bucket_lengths(1000, 128) + [128, 512]:
        doc = torch.zeros(2, T, dtype=torch.long)
        doc[:, T // 3 :] = 1
        llama_model.attention_mask(doc, None, kind="flex")
    torch._dynamo.reset()
    assert len(frames) == 2


def test_a_compiled_run_from_its_config_pads_to_static_shapes(tmp_path, one_rank, monkeypatch, capsys):
    """train.compile with train.shape_buckets auto, through the entry point and the loop: the loaders
    bucket, the blocks are compiled static, a graph for training and one for evaluation per shape."""
    import functools

    from llama_posttrain.train import distributed, loop
    from llama_posttrain.train.sft import main

    graphs, shapes = [], set()

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    real_step = loop.Trainer.train_step

    def train_step(self, batch, *args, **kw):
        shapes.update(tuple(mb.tokens.shape) for mb in batch.micro_batches)
        return real_step(self, batch, *args, **kw)

    monkeypatch.setattr(distributed, "parallelize", functools.partial(distributed.parallelize, compile_backend=backend))
    monkeypatch.setattr(loop.Trainer, "train_step", train_step)
    torch._dynamo.reset()
    quick = Path(__file__).parent.parent / "experiments" / "quickstart"
    evaluation = tmp_path / "eval.jsonl"  # a few of the eval examples: the eval graph, not the eval time
    evaluation.write_text("".join((quick / "data" / "sft_eval.jsonl").read_text().splitlines(True)[:8]))
    argv = ["--config", str(quick / "sft.yaml"), f"train.run_dir={tmp_path / 'run'}", "logging.progress=false"]
    argv += [f"data.eval={evaluation}", "data.cache=false", "data.tokens_per_microbatch=256", "train.save_every=0"]
    main([*argv, "train.steps=3", "train.compile=true"])
    torch._dynamo.reset()
    assert "static shapes: micro-batches of 4 rows x T tokens, T in [64]" in capsys.readouterr().out
    assert shapes == {(4, 64)} and len(graphs) == 2  # training, evaluation (no grad)
