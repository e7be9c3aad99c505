"""One model, several threads: concurrent `get_image_features` / `generate` calls on different images (and
batch sizes) each get exactly the answer the same call gives alone.

A web server's thread pool shares one model; anything a call records on shared modules (forward hooks,
attributes) would mix the threads' tensors. References are the same calls run one after another on one worker
thread (same thread pool machinery, so the same kernels); results are compared with `torch.equal`.
"""

import concurrent.futures
import random
import time

import numpy as np
import pytest
import torch
from PIL import Image

from llava_token_reduction.methods import METHODS
from methods_under_test import METHOD_NAMES, build_method


THREADS = 8
ROUNDS = 4
IMAGES = 12
BATCH_SIZES = (1, 2, 3)
DEADLINE_S = 120  # bounded: a hang fails instead of stalling the suite


def _pictures():
    rng = np.random.default_rng(7)
    return [Image.fromarray((rng.random((64, 64, 3)) * 255).astype("uint8")) for _ in range(IMAGES)]


def _build(method):
    model, processor, _ = build_method(method)
    return model, processor


def _jobs(method, processor, pictures):
    """Calls of several batch sizes over different images: (inputs of get_image_features, inputs of generate)."""
    questions = ["what is this", "how many cars", "", "is it red", "where is the dog", "what colour"]
    jobs = []
    start = 0
    for number, size in enumerate(BATCH_SIZES * 3):
        images = [pictures[(start + i) % IMAGES] for i in range(size)]
        start += size
        prompt = "USER: " + "<image>\n" * size + f"{questions[number % len(questions)]} ASSISTANT:"
        inputs = processor(images=images, text=[prompt], return_tensors="pt")
        feature_inputs = {k: inputs[k] for k in ("pixel_values",) + METHODS[method].side_inputs}
        jobs.append((feature_inputs, dict(inputs)))
    return jobs


def _features(model, inputs):
    with torch.no_grad():
        output = model.model.get_image_features(**inputs)
    return [tensor.clone() for tensor in output.pooler_output]


def _generate(model, inputs):
    return model.generate(**inputs, max_new_tokens=3, do_sample=False)


def _run_all(pool, call, jobs, order):
    futures = [pool.submit(call, jobs[index]) for index in order]
    return [future.result(timeout=DEADLINE_S) for future in futures]


def _concurrent_mismatches(call, same, jobs, expected, seed):
    """`(round, job)` of every result that differs from `expected` when random jobs run `THREADS` at a time."""
    rng = random.Random(seed)
    wrong = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=THREADS) as pool:
        for round_ in range(ROUNDS):
            order = [rng.randrange(len(jobs)) for _ in range(THREADS * 2)]
            results = _run_all(pool, call, jobs, order)
            wrong += [(round_, index) for index, result in zip(order, results) if not same(result, expected[index])]
    return wrong


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_concurrent_calls_each_get_their_own_answer(method):
    model, processor = _build(method)
    jobs = _jobs(method, processor, _pictures())
    began = time.monotonic()
    calls = {
        "get_image_features": (lambda job: _features(model, job[0]), lambda a, b: len(a) == len(b)
                               and all(torch.equal(x, y) for x, y in zip(a, b))),
        "generate": (lambda job: _generate(model, job[1]), torch.equal),
    }
    for name, (call, same) in calls.items():
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as alone:
            expected = _run_all(alone, call, jobs, range(len(jobs)))
        # The reference itself varies with the image: a test of mixing could not fail otherwise.
        if name == "get_image_features":
            assert not torch.equal(expected[0][0], expected[3][0])
        wrong = _concurrent_mismatches(call, same, jobs, expected, seed=0)
        assert not wrong, f"{method} {name}: {len(wrong)} concurrent results differ from the call alone: {wrong[:5]}"
    assert time.monotonic() - began < DEADLINE_S


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_concurrent_cut_and_full_depth_calls_do_not_mix(method):
    """Calls that stop at layer -2 (the dead-layer cut) and calls that ask for the last hidden state (full depth)
    in flight together on one model: each gets the answer it gets alone, and the cut calls' hidden states are
    theirs (nothing of the depth is kept on the shared modules)."""
    model, processor = _build(method)
    jobs = []
    for job_inputs, _ in _jobs(method, processor, _pictures()):
        jobs += [(job_inputs, None), (job_inputs, [-1]), (job_inputs, [0])]

    def call(job):
        inputs, asked = job
        with torch.no_grad():
            output = model.model.get_image_features(**inputs, output_hidden_states=asked)
        states = () if output.hidden_states is None else tuple(s for s in output.hidden_states if s is not None)
        return [t.clone() for t in output.pooler_output], [s.clone() for s in states]

    def same(a, b):
        return (len(a[0]) == len(b[0]) and all(torch.equal(x, y) for x, y in zip(a[0], b[0]))
                and len(a[1]) == len(b[1]) and all(torch.equal(x, y) for x, y in zip(a[1], b[1])))

    began = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as alone:
        expected = _run_all(alone, call, jobs, range(len(jobs)))
    assert all(not result[1] for result in expected[::3]) and all(len(result[1]) == 1 for result in expected[1::3])
    wrong = _concurrent_mismatches(call, same, jobs, expected, seed=1)
    assert not wrong, f"{method}: {len(wrong)} concurrent results differ from the call alone: {wrong[:5]}"
    assert time.monotonic() - began < DEADLINE_S
