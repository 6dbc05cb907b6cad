"""BlockManager and Scheduler on their own (no model): allocation, reference counts, prefix hashes, freeing
under preemption, the token budget and the preemption order. Property-based with hypothesis."""

import collections

from hypothesis import given, settings
from hypothesis import strategies as st

from infer.block_manager import BlockManager
from infer.sampling import SamplingParams
from infer.scheduler import Scheduler
from infer.sequence import Sequence, Status

SP = SamplingParams(temperature=0, max_tokens=1000, ignore_eos=True)


def seq(tokens, max_tokens=1000, parent=None, index=0):
    return Sequence(list(tokens), SP, seed=0, max_tokens=max_tokens, parent=parent, index=index)


def check_invariants(bm: BlockManager, live: list[Sequence]) -> None:
    held = collections.Counter(b for s in live for b in s.block_table)
    for block in bm.blocks:
        assert block.ref_count == held[block.id], (block.id, block.ref_count, held[block.id])
    assert sorted(bm.free) == sorted(b.id for b in bm.blocks if b.ref_count == 0)
    assert len(set(bm.free)) == len(bm.free)
    for h, block_id in bm.hash_to_block.items():
        assert bm.blocks[block_id].hash == h
    bs = bm.block_size
    for s in live:  # a registered block holds exactly the tokens its hash names
        for i, h in enumerate(s.hashes):
            block = bm.blocks[s.block_table[i]]
            if block.hash == h:
                assert block.token_ids == tuple(s.token_ids[i * bs:(i + 1) * bs])


# A small alphabet and prompts built from a few shared stems, so prefixes collide often.
stems = st.lists(st.integers(0, 3), min_size=0, max_size=20)
ops = st.lists(st.tuples(st.sampled_from(["add", "step", "free"]), st.integers(0, 2**16), stems), min_size=1,
               max_size=40)


@settings(max_examples=150, deadline=None)
@given(ops=ops, block_size=st.sampled_from([1, 2, 4]), num_blocks=st.integers(4, 24))
def test_block_manager_invariants_under_random_operations(ops, block_size, num_blocks):
    bm = BlockManager(num_blocks, block_size)
    live: list[Sequence] = []
    for op, k, stem in ops:
        if op == "add":
            s = seq([7, 7] + stem + [k % 5 + 1])
            if bm.can_allocate(s):
                bm.allocate(s)
                assert s.num_cached % block_size == 0 and s.num_cached <= len(s) - 1
                live.append(s)
        elif op == "step" and live:  # compute the next chunk of one sequence, then maybe a new token
            s = live[k % len(live)]
            s.num_computed = min(len(s), s.num_computed + 1 + k % 7)
            bm.commit(s)
            if s.num_computed == len(s):  # sampled a token: it needs a slot for its K/V next step
                s.output_ids.append(k % 4)
                if bm.can_append(s):
                    bm.append_slot(s)
                else:  # the pool is full: the scheduler would preempt it
                    bm.deallocate(live.remove(s) or s)
        elif op == "free" and live:  # finish or preempt: either way the blocks go back
            bm.deallocate(live.pop(k % len(live)))
        check_invariants(bm, live)
    for s in live:
        bm.deallocate(s)
    assert bm.num_free == num_blocks


@settings(max_examples=100, deadline=None)
@given(prefix_blocks=st.integers(1, 4), tail=st.lists(st.integers(0, 9), min_size=1, max_size=6),
       block_size=st.sampled_from([2, 4]))
def test_shared_prefix_is_reused_only_once_computed(prefix_blocks, tail, block_size):
    bm = BlockManager(64, block_size)
    prefix = list(range(100, 100 + prefix_blocks * block_size))
    a, b = seq(prefix + tail), seq(prefix + [999] + tail)
    bm.allocate(a)
    bm.allocate(b)  # a's blocks are not computed yet: nothing to share
    assert b.num_cached == 0
    bm.deallocate(b)
    a.num_computed = len(a)
    bm.commit(a)
    c = seq(prefix + [999] + tail)
    bm.allocate(c)
    assert c.num_cached == prefix_blocks * block_size and c.block_table[:prefix_blocks] == a.block_table[:prefix_blocks]
    assert all(bm.blocks[i].ref_count == 2 for i in a.block_table[:prefix_blocks])
    bm.deallocate(a)
    bm.deallocate(c)
    d = seq(prefix + [5])  # freed blocks keep their hashes: a later prompt revives them
    bm.allocate(d)
    assert d.num_cached == prefix_blocks * block_size
    check_invariants(bm, [d])


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=8), budget=st.integers(1, 32),
       max_seqs=st.integers(1, 4))
def test_scheduler_respects_the_token_budget_and_sequence_cap(lengths, budget, max_seqs):
    sch = Scheduler(num_blocks=200, block_size=4, max_num_seqs=max_seqs, max_num_batched_tokens=budget,
                    max_model_len=64)
    seqs = [seq(range(10, 10 + n), max_tokens=3) for n in lengths]
    for s in seqs:
        sch.add(s)
    for _ in range(500):
        if sch.done:
            break
        batch = sch.schedule()
        assert 1 <= len(batch) <= max_seqs and len(sch.running) <= max_seqs
        prefill = any(s.in_prefill or k > 1 for s, k in batch)
        if prefill:
            assert sum(k for _, k in batch) <= budget
            assert all(k == len(s) - s.num_computed for s, k in batch[1:])  # only a step's first is split
        else:
            assert all(k == 1 for _, k in batch)
        valid = [s.num_computed + k == len(s) for s, k in batch]
        sch.postprocess(batch, [1] * len(batch), valid)
    assert sch.done and all(s.finished and len(s.output_ids) == 3 for s in seqs)
    assert sch.block_manager.num_free == 200 and sorted(sch.free_slots) == list(range(max_seqs))


def test_a_prompt_waits_for_room_rather_than_split_unless_it_starts_a_step():
    """64-token steps: a 40-token prompt leaves 24, so the next 40-token one waits for the next step whole;
    a 100-token prompt, too long for any step, is split in the step it starts, and its continuation leaves
    no room for the prompt after it."""
    sch = Scheduler(num_blocks=200, block_size=4, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256)
    a, b, c, d = (seq(range(i * 1000, i * 1000 + n), max_tokens=2) for i, n in enumerate([40, 40, 100, 30]))
    for s in (a, b, c, d):
        sch.add(s)
    steps = []
    while sch.running or sch.waiting:
        batch = sch.schedule()
        if all(k == 1 and not s.in_prefill for s, k in batch):
            break
        steps.append([(s, k) for s, k in batch])
        sch.postprocess(batch, [1] * len(batch), [s.num_computed + k == len(s) for s, k in batch])
    assert steps == [[(a, 40)], [(b, 40)], [(c, 64)], [(c, 36)], [(d, 30)]]


def test_preemption_takes_the_newest_and_requeues_it_first():
    # 6 blocks of 4 tokens: three 8-token prompts fill the pool (d must wait); after one sampled token each
    # needs a third block, so the newest running one (c) is preempted and goes back in front of d.
    sch = Scheduler(num_blocks=6, block_size=4, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=32)
    a, b, c, d = (seq(range(i * 10, i * 10 + 8)) for i in range(4))
    for s in (a, b, c, d):
        sch.add(s)
    batch = sch.schedule()
    assert [s for s, _ in batch] == [a, b, c] and list(sch.waiting) == [d]
    sch.postprocess(batch, [1, 1, 1], [True, True, True])
    decode = sch.schedule()
    assert [s for s, _ in decode] == [a, b] and sch.num_preemptions == 1
    assert list(sch.waiting) == [c, d] and c.status == Status.WAITING and c.block_table == []
    assert c.slot >= 0 and c.num_computed == 0  # it keeps its penalty slot and will be recomputed


def test_sample_siblings_wait_for_the_parents_prompt_blocks():
    sch = Scheduler(num_blocks=32, block_size=4, max_num_seqs=8, max_num_batched_tokens=4, max_model_len=64)
    parent = seq(range(1, 14))  # 13 tokens: 3 full blocks before the last token
    kids = [seq(range(1, 14), parent=parent, index=i) for i in (1, 2)]
    for s in [parent, *kids]:
        sch.add(s)
    for _ in range(3):  # 4-token chunks: the parent needs 3 steps for its 12 shareable tokens
        batch = sch.schedule()
        assert [s for s, _ in batch] == [parent]
        sch.postprocess(batch, [0], [False])
    batch = sch.schedule()  # now the siblings find the 3 blocks in the prefix cache
    assert {s.index for s, _ in batch} >= {1}
    assert all(k.num_cached == 12 for k in kids if k.status == Status.RUNNING)
    assert all(sch.block_manager.blocks[i].ref_count >= 2 for i in parent.block_table[:3])
