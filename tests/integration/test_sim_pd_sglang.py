"""SGLang-style parallel P/D between two omni-sim processes: both receive the same body with
bootstrap_host/port/room, meet at the prefill's bootstrap server, and time out cleanly when the
other side never comes."""
import random
import threading
import time
import unittest

from simlib import Sim, get, metric, metrics, post


class SglangPdTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.p = Sim("--engine", "sglang", "--role", "prefill", "--bootstrap-port", "0",
                    "--bootstrap-timeout", "1.5")
        cls.d = Sim("--engine", "sglang", "--role", "decode", "--waiting-timeout", "1.5")
        cls.bootstrap_port = cls.p.instances[0]["bootstrap_port"]

    @classmethod
    def tearDownClass(cls):
        cls.p.stop()
        cls.d.stop()

    def body(self, room, **extra):
        b = {"text": "a shared system prompt and then a question", "stream": False,
             "sampling_params": {"max_new_tokens": 5}, "bootstrap_host": "127.0.0.1",
             "bootstrap_port": self.bootstrap_port, "bootstrap_room": room}
        b.update(extra)
        return b

    def both(self, p_path, p_body, d_path, d_body, d_delay=0.0, p_delay=0.0):
        """Sends to P and D concurrently; returns (p_response, d_response)."""
        out = {}

        def send(name, port, path, body, delay):
            time.sleep(delay)
            out[name] = post(port, path, body)

        threads = [threading.Thread(target=send, args=("p", self.p.port(), p_path, p_body, p_delay)),
                   threading.Thread(target=send, args=("d", self.d.port(), d_path, d_body, d_delay))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        return out["p"], out["d"]

    def test_rendezvous_generate(self):
        room = random.randrange(2**63)
        p, d = self.both("/generate", self.body(room), "/generate", self.body(room))
        self.assertEqual(p.status, 200, p.body)
        self.assertEqual(d.status, 200, d.body)
        dj = d.json()
        self.assertEqual(dj["meta_info"]["completion_tokens"], 5)
        self.assertEqual(dj["meta_info"]["finish_reason"], {"type": "length", "length": 5})
        self.assertEqual(len(dj["output_ids"]), 5)

    def test_rendezvous_in_either_order(self):
        for p_delay, d_delay in ((0.0, 0.3), (0.3, 0.0)):
            with self.subTest(p_delay=p_delay, d_delay=d_delay):
                room = random.randrange(2**63)
                p, d = self.both("/generate", self.body(room), "/generate", self.body(room),
                                 d_delay=d_delay, p_delay=p_delay)
                self.assertEqual((p.status, d.status), (200, 200), (p.body, d.body))

    def test_rendezvous_openai_chat_streamed(self):
        room = random.randrange(2**63)
        body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4,
                "stream": True, "bootstrap_host": "127.0.0.1",
                "bootstrap_port": self.bootstrap_port, "bootstrap_room": room}
        p, d = self.both("/v1/chat/completions", body, "/v1/chat/completions", body)
        self.assertEqual(d.status, 200)
        chunks = d.json_events()
        self.assertEqual(chunks[-1]["choices"][0]["finish_reason"], "length")
        self.assertEqual(d.events()[-1], "[DONE]")
        self.assertEqual(p.events()[-1], "[DONE]")

    def test_batch_gets_one_room_per_item(self):
        rooms = [random.randrange(2**63) for _ in range(3)]
        body = {"text": ["first prompt", "second prompt", "third prompt"],
                "sampling_params": {"max_new_tokens": 2},
                "bootstrap_host": ["127.0.0.1"] * 3,
                "bootstrap_port": [self.bootstrap_port] * 3, "bootstrap_room": rooms}
        p, d = self.both("/generate", body, "/generate", body)
        self.assertEqual((p.status, d.status), (200, 200), (p.body, d.body))
        self.assertEqual(len(d.json()), 3)
        self.assertTrue(all(item["meta_info"]["completion_tokens"] == 2 for item in d.json()))

    def test_prefill_times_out_without_decode(self):
        room = random.randrange(2**63)
        t0 = time.monotonic()
        r = post(self.p.port(), "/generate", self.body(room))
        elapsed = time.monotonic() - t0
        self.assertEqual(r.status, 500)
        self.assertIn("KVTransferError(bootstrap_room=%d)" % room, r.json()["error"]["message"])
        self.assertIn("KVPoll.Bootstrapping", r.json()["error"]["message"])
        self.assertGreater(elapsed, 1.4)
        self.assertLess(elapsed, 5)

    def test_decode_times_out_without_prefill(self):
        room = random.randrange(2**63)
        t0 = time.monotonic()
        r = post(self.d.port(), "/generate", self.body(room))
        self.assertEqual(r.status, 500)
        self.assertIn("KVTransferError(bootstrap_room=%d)" % room, r.json()["error"]["message"])
        self.assertLess(time.monotonic() - t0, 5)

    def test_decode_fails_fast_when_prefill_is_unreachable(self):
        body = self.body(random.randrange(2**63))
        body["bootstrap_port"] = 1  # nothing listens there
        t0 = time.monotonic()
        r = post(self.d.port(), "/generate", body)
        self.assertEqual(r.status, 500)
        self.assertIn("cannot reach the prefill bootstrap server", r.json()["error"]["message"])
        self.assertLess(time.monotonic() - t0, 1)

    def test_bad_bootstrap_fields(self):
        cases = [
            {"bootstrap_room": -1},
            {"bootstrap_port": "x"},
            {"bootstrap_host": None},
            {"bootstrap_room": [1, 2]},
        ]
        for override in cases:
            with self.subTest(override=override):
                r = post(self.d.port(), "/generate", self.body(1, **override))
                self.assertEqual(r.status, 400, r.body)
                self.assertIn("error", r.json())

    def test_loads_and_server_info(self):
        loads = get(self.p.port(), "/v1/loads").json()
        self.assertEqual(len(loads["loads"]), 1)
        load = loads["loads"][0]
        for key in ("num_running_reqs", "num_waiting_reqs", "num_waiting_uncached_tokens",
                    "num_used_tokens", "max_total_num_tokens", "token_usage", "cache_hit_rate",
                    "max_running_requests"):
            self.assertIn(key, load)
        self.assertEqual(load["disaggregation"]["mode"], "prefill")
        info = get(self.p.port(), "/get_server_info").json()
        self.assertEqual(info["disaggregation_bootstrap_port"], self.bootstrap_port)
        self.assertEqual(info["disaggregation_mode"], "prefill")
        m = metrics(self.d.port())
        for name in ("sglang:num_running_reqs", "sglang:num_queue_reqs", "sglang:token_usage",
                     "sglang:cache_hit_rate"):
            self.assertGreaterEqual(metric(m, name, engine_type="decode"), 0)


if __name__ == "__main__":
    unittest.main()
