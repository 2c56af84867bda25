"""Fault injection: errors, hangs, mid-stream disconnects, slowness and crashes."""
import http.client
import socket
import time
import unittest

from simlib import Sim, get, metric, metrics, post

BODY = {"prompt": "fault injection test prompt", "max_tokens": 8}


class FaultTest(unittest.TestCase):
    def test_error_rate_one_fails_every_request_with_engine_error(self):
        with Sim("--fault-error-rate", "1") as s:
            for _ in range(3):
                r = post(s.port(), "/v1/completions", BODY)
                self.assertEqual(r.status, 500)
                self.assertEqual(r.json()["error"]["type"], "InternalServerError")
            # Only generation requests are affected.
            self.assertEqual(get(s.port(), "/health").status, 200)
            self.assertEqual(metric(metrics(s.port()), "omni_sim:faults_injected_total",
                                    kind="error"), 3)

    def test_error_rate_is_a_fraction(self):
        with Sim("--fault-error-rate", "0.5", "--seed", "7") as s:
            statuses = [post(s.port(), "/v1/completions", BODY).status for _ in range(60)]
            errors = statuses.count(500)
            self.assertEqual(errors + statuses.count(200), 60)
            self.assertGreater(errors, 15)
            self.assertLess(errors, 45)

    def test_hang_never_answers_but_instance_stays_healthy(self):
        with Sim("--fault-hang-rate", "1") as s:
            with self.assertRaises(socket.timeout):
                post(s.port(), "/v1/completions", BODY, timeout=0.5)
            self.assertEqual(get(s.port(), "/health").status, 200)

    def test_disconnect_cuts_the_stream(self):
        with Sim("--fault-disconnect-rate", "1") as s:
            conn = http.client.HTTPConnection("127.0.0.1", s.port(), timeout=5)
            conn.request("POST", "/v1/completions",
                         body='{"prompt": "x", "max_tokens": 50, "stream": true}',
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            self.assertEqual(resp.status, 200)
            with self.assertRaises((http.client.IncompleteRead, ConnectionResetError)):
                data = resp.read()
                # A reset may also surface as a short read without [DONE].
                if b"[DONE]" not in data:
                    raise http.client.IncompleteRead(data)
            conn.close()
            self.assertEqual(get(s.port(), "/health").status, 200)

    def test_slow_requests_are_delayed(self):
        with Sim("--fault-slow-rate", "1", "--fault-slow-ms", "300") as s:
            t0 = time.monotonic()
            self.assertEqual(post(s.port(), "/v1/completions", BODY).status, 200)
            self.assertGreaterEqual(time.monotonic() - t0, 0.3)

    def test_slowdown_multiplies_step_time(self):
        def seconds(*args):
            with Sim(*args) as s:
                t0 = time.monotonic()
                self.assertEqual(post(s.port(), "/v1/completions",
                                      {"prompt": "x", "max_tokens": 40}).status, 200)
                return time.monotonic() - t0
        base = seconds()
        slow = seconds("--fault-slowdown", "10")
        self.assertGreater(slow, base * 4)

    def test_crash_after_n_requests(self):
        with Sim("--fault-crash-after", "2", "--instances", "2", "--fault-instances", "0") as s:
            for _ in range(2):
                self.assertEqual(post(s.port(0), "/v1/completions", BODY).status, 200)
            with self.assertRaises((ConnectionError, http.client.RemoteDisconnected)):
                post(s.port(0), "/v1/completions", BODY)
            with self.assertRaises(ConnectionRefusedError):
                get(s.port(0), "/health")
            # The other instance, outside --fault-instances, keeps serving.
            for _ in range(4):
                self.assertEqual(post(s.port(1), "/v1/completions", BODY).status, 200)

    def test_bad_flags_fail_with_a_message(self):
        import subprocess
        from simlib import SIM
        for args, needle in ((["--engine", "tgi"], "--engine"),
                             (["--fault-error-rate", "2"], "--fault-error-rate"),
                             (["--profile", "nope"], "unknown profile"),
                             (["--bogus"], "unknown option")):
            with self.subTest(args=args):
                r = subprocess.run([SIM] + args, capture_output=True, text=True, timeout=10)
                self.assertEqual(r.returncode, 2)
                self.assertIn(needle, r.stderr)


if __name__ == "__main__":
    unittest.main()
