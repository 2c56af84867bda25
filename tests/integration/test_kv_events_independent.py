"""Decodes omni-sim's KV events with an independent decoder (Debian's python3-zmq and
python3-msgpack, no project code) and checks every field, both encodings, both hash kinds, the
event kinds, sequence numbers and the replay socket."""
import hashlib
import struct
import time
import unittest

import msgpack
import zmq

from simlib import Sim, post

MASK = (1 << 64) - 1
ROOT = 0x9E3779B97F4A7C15
MUL1, MUL2, PRIME = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB, 0x9FB21C651E98DF25


def _mix(x):
    x ^= x >> 30
    x = (x * MUL1) & MASK
    x ^= x >> 27
    x = (x * MUL2) & MASK
    x ^= x >> 31
    return x


def fast64_chain(tokens, block_size):
    """docs/simulator.md's 64-bit block hash, re-implemented from its description."""
    out, parent = [], ROOT
    for start in range(0, len(tokens) - block_size + 1, block_size):
        toks = tokens[start:start + block_size]
        h = _mix(parent ^ ((len(toks) * PRIME) & MASK))
        i = 0
        while i + 1 < len(toks):
            word = (toks[i] << 32) | toks[i + 1]
            h = (_mix(h ^ ((word * PRIME) & MASK)) + MUL2) & MASK
            i += 2
        if i < len(toks):
            h = (_mix(h ^ ((toks[i] * PRIME) & MASK)) + MUL1) & MASK
        parent = _mix(h)
        out.append(parent)
    return out


def sha256_chain(tokens, block_size):
    out, parent = [], bytes(32)
    for start in range(0, len(tokens) - block_size + 1, block_size):
        data = parent + b"".join(struct.pack("<I", t) for t in tokens[start:start + block_size])
        parent = hashlib.sha256(data).digest()
        out.append(parent)
    return out


STORED_FIELDS = ["block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id",
                 "medium", "lora_name"]


def normalize(event):
    """An event, array or map form, as (tag, {field: value})."""
    if isinstance(event, dict):
        fields = dict(event)
        return fields.pop("type"), fields
    tag, values = event[0], event[1:]
    names = {"BlockStored": STORED_FIELDS, "BlockRemoved": ["block_hashes", "medium"],
             "AllBlocksCleared": []}[tag]
    return tag, dict(zip(names, values))


class Subscriber:
    def __init__(self, endpoint, topic=b""):
        self.ctx = zmq.Context()
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, topic)
        self.sub.connect(endpoint)
        time.sleep(0.3)  # let the subscription reach the publisher

    def batches(self, wait=2.0, until=None):
        """(topic, seq, batch) tuples received until `until(batches)` or `wait` seconds."""
        out = []
        deadline = time.time() + wait
        while time.time() < deadline:
            if self.sub.poll(50):
                frames = self.sub.recv_multipart()
                assert len(frames) == 3, frames
                topic, seq, payload = frames
                assert len(seq) == 8
                out.append((topic, struct.unpack(">q", seq)[0], msgpack.unpackb(payload, raw=False)))
                if until is not None and until(out):
                    break
        return out

    def close(self):
        self.sub.close(0)
        self.ctx.term()


def replay(endpoint, start):
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.connect(endpoint)
    s.send_multipart([b"", struct.pack(">q", start)])
    out = []
    try:
        while True:
            if not s.poll(5000):
                raise AssertionError("replay timed out")
            frames = s.recv_multipart()
            assert frames[0] == b"" and len(frames) == 3, frames
            seq = struct.unpack(">q", frames[1])[0]
            if seq == -1:
                assert frames[1] == b"\xff" * 8 and frames[2] == b""
                return out
            out.append((seq, msgpack.unpackb(frames[2], raw=False)))
    finally:
        s.close(0)
        ctx.term()


class KvEventsTest(unittest.TestCase):
    def run_case(self, encoding, hash_kind):
        with Sim("--engine", "vllm", "--kv-events", "--kv-events-encoding", encoding,
                 "--kv-hash", hash_kind, "--kv-events-topic", "kv@test", "--num-blocks", "12",
                 "--max-model-len", "192") as s:
            inst = s.instances[0]
            sub = Subscriber(inst["kv_events_endpoint"], b"kv@test")
            try:
                first = list(range(10000, 10000 + 40))           # 2 full blocks + 8 tokens
                second = first[:32] + list(range(20000, 20000 + 34))  # extends the first chain
                self.assertEqual(post(s.port(), "/v1/completions",
                                      {"prompt": first, "max_tokens": 1}).status, 200)
                self.assertEqual(post(s.port(), "/v1/completions",
                                      {"prompt": second, "max_tokens": 1}).status, 200)
                # A different 160-token prompt needs 10 of 12 blocks: cached ones are evicted.
                third = list(range(30000, 30000 + 150))
                self.assertEqual(post(s.port(), "/v1/completions",
                                      {"prompt": third, "max_tokens": 1}).status, 200)
                self.assertEqual(post(s.port(), "/reset_prefix_cache", None).status, 200)
                live = sub.batches(wait=5, until=lambda b: any(
                    normalize(e)[0] == "AllBlocksCleared" for _, _, batch in b for e in batch[1]))
            finally:
                sub.close()

            # Frames: topic, then sequence numbers counting from 0 without gaps.
            self.assertTrue(live)
            self.assertTrue(all(t == b"kv@test" for t, _, _ in live))
            seqs = [seq for _, seq, _ in live]
            self.assertEqual(seqs, list(range(seqs[0], seqs[0] + len(seqs))))
            # The replay socket returns every batch from 0, including any the SUB missed.
            replayed = replay(inst["kv_replay_endpoint"], 0)
            self.assertEqual([seq for seq, _ in replayed], list(range(len(replayed))))
            self.assertEqual(replayed[-1][0], seqs[-1])
            by_seq = dict(replayed)
            for _, seq, batch in live:
                self.assertEqual(by_seq[seq], batch)
            tail = replay(inst["kv_replay_endpoint"], seqs[-1])
            self.assertEqual([seq for seq, _ in tail], [seqs[-1]])

            events = []
            for _, batch in replayed:
                self.assertIsInstance(batch, list)
                self.assertEqual(len(batch), 3)
                ts, evs, rank = batch
                self.assertIsInstance(ts, float)
                self.assertLess(abs(ts - time.time()), 120)
                self.assertEqual(rank, 0)
                for e in evs:
                    if encoding == "map":
                        self.assertIsInstance(e, dict)
                    else:
                        self.assertIsInstance(e, list)
                    events.append(normalize(e))

            chain = fast64_chain if hash_kind == "fast64" else sha256_chain
            expect_first = chain(first, 16)
            expect_second = chain(second, 16)
            self.assertEqual(expect_first, expect_second[:2])
            stored = [f for tag, f in events if tag == "BlockStored"]
            # Request 1 stores its 2 full blocks from the root.
            s1 = stored[0]
            if encoding == "map":
                self.assertEqual(set(s1), set(STORED_FIELDS) - {"lora_name"})
            self.assertEqual(s1["block_hashes"], expect_first)
            self.assertIsNone(s1["parent_block_hash"])
            self.assertEqual(s1["token_ids"], first[:32])
            self.assertEqual(s1["block_size"], 16)
            self.assertIsNone(s1["lora_id"])
            self.assertEqual(s1["medium"], "GPU")
            self.assertIsNone(s1.get("lora_name"))
            # Request 2 hits those 2 blocks and extends the chain with 2 more.
            s2 = stored[1]
            self.assertEqual(s2["parent_block_hash"], expect_first[-1])
            self.assertEqual(s2["block_hashes"], expect_second[2:4])
            self.assertEqual(s2["token_ids"], second[32:64])
            for h in s1["block_hashes"] + s2["block_hashes"]:
                self.assertIsInstance(h, int if hash_kind == "fast64" else bytes)
                if hash_kind == "fast64":
                    self.assertTrue(0 <= h <= MASK)
                else:
                    self.assertEqual(len(h), 32)
            # Request 3 evicted cached blocks, reported by hash.
            removed = [f for tag, f in events if tag == "BlockRemoved"]
            self.assertTrue(removed)
            removed_hashes = [h for f in removed for h in f["block_hashes"]]
            self.assertTrue(set(removed_hashes) <= set(expect_first + expect_second[2:4] +
                                                       chain(third, 16)))
            self.assertTrue(all(f["medium"] == "GPU" for f in removed))
            # Reset: one AllBlocksCleared, with no fields.
            cleared = [f for tag, f in events if tag == "AllBlocksCleared"]
            self.assertEqual(cleared, [{}])

    def test_map_encoding_int_hashes(self):
        self.run_case("map", "fast64")

    def test_array_encoding_int_hashes(self):
        self.run_case("array", "fast64")

    def test_map_encoding_byte_hashes(self):
        self.run_case("map", "sha256")

    def test_array_encoding_byte_hashes(self):
        self.run_case("array", "sha256")

    def test_sglang_layout(self):
        with Sim("--engine", "sglang", "--kv-events") as s:
            post(s.port(), "/generate", {"input_ids": list(range(500, 548)),
                                         "sampling_params": {"max_new_tokens": 1}})
            time.sleep(0.2)
            replayed = replay(s.instances[0]["kv_replay_endpoint"], 0)
            event = replayed[0][1][1][0]
            # SGLang's array layout: [tag, block_hashes, parent, token_ids, block_size, lora_id,
            # medium].
            self.assertEqual(event[0], "BlockStored")
            self.assertEqual(event[1], fast64_chain(list(range(500, 548)), 16))
            self.assertIsNone(event[2])
            self.assertEqual(event[3], list(range(500, 548)))
            self.assertEqual(event[4], 16)
            self.assertIsNone(event[5])

    def test_malformed_replay_requests_are_ignored(self):
        with Sim("--engine", "vllm", "--kv-events") as s:
            ep = s.instances[0]["kv_replay_endpoint"]
            ctx = zmq.Context()
            bad = ctx.socket(zmq.DEALER)
            bad.connect(ep)
            bad.send_multipart([b"", b"short"])
            bad.send_multipart([b"garbage"])
            self.assertFalse(bad.poll(300))
            bad.close(0)
            ctx.term()
            self.assertEqual(replay(ep, 0), [])  # still serving


if __name__ == "__main__":
    unittest.main()
