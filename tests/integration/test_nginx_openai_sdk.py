"""The official OpenAI SDK (npm `openai`, v6) through Debian's nginx with the module, in front of
omni-sim: chat completions and completions, streamed and not, through a sequential (vLLM P/D)
location and an aggregated one, plus the SDK's typed errors for invalid requests; and the same
through two locations where the proxy tokenizes (DeepSeek-V3) and forwards token ids, chats sent
as completions and converted back, which the SDK must not be able to tell apart.

nginx_sdk_client.mjs makes the SDK calls and prints what the SDK saw as JSON; the assertions are
here. The same script also runs against the aggregated omni-sim directly, as the reference for
prompt token counts. nginx runs 2 workers; error.log must stay free of [alert], [crit], [emerg].
"""
import json
import os
import shutil
import subprocess
import unittest

from simlib import Sim, free_port, port_open, tokenizer_dir, wait_until
from test_nginx_module import Nginx

HERE = os.path.dirname(os.path.abspath(__file__))
CLIENT = os.path.join(HERE, "nginx_sdk_client.mjs")
MAX_TOKENS = 7          # what nginx_sdk_client.mjs asks for
DEFAULT_MAX_TOKENS = 16  # omni-sim's --default-max-tokens: length of requests without max_tokens


def tok_config(agg_port, prefill_port, decode_port, seq_listen, agg_listen):
    """The same two locations with the proxy tokenizing (DeepSeek-V3) and forwarding ids, in
    front of sims that tokenize text with the same tokenizer (the reference counts)."""
    return """
    omni_proxy_tokenizer ds {tok};
    upstream tagg {{ server 127.0.0.1:{agg} max_fails=0; keepalive 8; }}
    upstream tprefill {{ server 127.0.0.1:{prefill} max_fails=0; keepalive 8; }}
    upstream tdecode {{ server 127.0.0.1:{decode} max_fails=0; keepalive 8; }}
    server {{
        listen 127.0.0.1:{seq_listen};
        omni_proxy_prefill_timeout 20s;
        omni_proxy_decode_timeout 20s;
        location /v1/ {{
            omni_proxy;
            omni_proxy_mode sequential;
            omni_proxy_prefill_upstream tprefill;
            omni_proxy_decode_upstream tdecode;
            omni_proxy_tokenize ds;
        }}
    }}
    server {{
        listen 127.0.0.1:{agg_listen};
        omni_proxy_decode_timeout 20s;
        location /v1/ {{
            omni_proxy;
            omni_proxy_upstream tagg;
            omni_proxy_tokenize ds;
        }}
    }}
""".format(tok=tokenizer_dir(), agg=agg_port, prefill=prefill_port, decode=decode_port,
           seq_listen=seq_listen, agg_listen=agg_listen)


def config(agg_port, prefill_port, decode_port, seq_port, agg_listen):
    return """
    omni_proxy_zone omni 4m;
    upstream agg {{
        server 127.0.0.1:{agg} max_fails=0;
        keepalive 8;
    }}
    upstream prefill {{
        server 127.0.0.1:{prefill} max_fails=0;
        keepalive 8;
    }}
    upstream decode {{
        server 127.0.0.1:{decode} max_fails=0;
        keepalive 8;
    }}
    server {{
        listen 127.0.0.1:{seq_port};
        omni_proxy_prefill_timeout 20s;
        omni_proxy_decode_timeout 20s;
        location /v1/ {{
            omni_proxy;
            omni_proxy_mode sequential;
            omni_proxy_prefill_upstream prefill;
            omni_proxy_decode_upstream decode;
        }}
    }}
    server {{
        listen 127.0.0.1:{agg_listen};
        omni_proxy_decode_timeout 20s;
        location /v1/ {{
            omni_proxy;
            omni_proxy_mode aggregated;
            omni_proxy_upstream agg;
        }}
    }}
""".format(agg=agg_port, prefill=prefill_port, decode=decode_port, seq_port=seq_port,
           agg_listen=agg_listen)




class NginxOpenAISdkTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        node = shutil.which("node")
        if node is None:
            raise unittest.SkipTest("node is not installed")
        cls.sims = []
        cls.nginx = None
        try:
            common = ("--engine", "vllm", "--default-max-tokens", str(DEFAULT_MAX_TOKENS))
            cls.agg = Sim(*common)
            cls.sims.append(cls.agg)
            cls.prefill = Sim(*common, "--role", "prefill")
            cls.sims.append(cls.prefill)
            cls.decode = Sim(*common, "--role", "decode")
            cls.sims.append(cls.decode)
            tok = ("--tokenizer", tokenizer_dir())
            cls.tagg = Sim(*common, *tok)
            cls.sims.append(cls.tagg)
            cls.tprefill = Sim(*common, *tok, "--role", "prefill")
            cls.sims.append(cls.tprefill)
            cls.tdecode = Sim(*common, *tok, "--role", "decode")
            cls.sims.append(cls.tdecode)
            agg_listen = free_port(3)
            tseq_listen, tagg_listen = agg_listen + 1, agg_listen + 2
            cls.nginx = Nginx(config(cls.agg.port(), cls.prefill.port(), cls.decode.port(),
                                     "PORT", agg_listen) +
                              tok_config(cls.tagg.port(), cls.tprefill.port(),
                                         cls.tdecode.port(), tseq_listen, tagg_listen))
            r = cls.nginx.run()
            if r.returncode != 0:
                raise RuntimeError("nginx did not start: " + r.stderr)
            for port in (cls.nginx.port, agg_listen, tseq_listen, tagg_listen):
                if not wait_until(lambda: port_open(port), 10):
                    raise RuntimeError("nginx does not listen on %d" % port)
            targets = {
                "seq": "http://127.0.0.1:%d/v1" % cls.nginx.port,
                "agg": "http://127.0.0.1:%d/v1" % agg_listen,
                "direct": "http://127.0.0.1:%d/v1" % cls.agg.port(),
                # Token forwarding: the proxy tokenizes, the engines get ids.
                "seqtok": "http://127.0.0.1:%d/v1" % tseq_listen,
                "aggtok": "http://127.0.0.1:%d/v1" % tagg_listen,
                "directtok": "http://127.0.0.1:%d/v1" % cls.tagg.port(),
            }
            proc = subprocess.run([node, CLIENT, json.dumps(targets)], cwd=HERE,
                                  capture_output=True, text=True, timeout=90)
            if proc.returncode != 0:
                raise RuntimeError("nginx_sdk_client.mjs failed (%d):\n%s\n%s" %
                                   (proc.returncode, proc.stdout[-2000:], proc.stderr[-4000:]))
            cls.out = json.loads(proc.stdout.strip().splitlines()[-1])
        except BaseException:
            cls._stop_all()
            raise

    @classmethod
    def _stop_all(cls):
        """Stops nginx and every sim; returns what went wrong (error.log lines, sim exits)."""
        problems = []
        try:
            if cls.nginx is not None:
                problems += cls.nginx.errors()
                cls.nginx.cleanup()
                cls.nginx = None
        finally:
            for s in cls.sims:
                try:
                    s.stop()
                except AssertionError as e:  # an exit status or sanitizer report
                    problems.append(str(e))
            cls.sims = []
        return problems

    @classmethod
    def tearDownClass(cls):
        problems = cls._stop_all()
        assert problems == [], problems

    # --- helpers ----------------------------------------------------------------------------

    def result(self, target, case):
        r = self.out[target][case]
        self.assertFalse(isinstance(r, dict) and r.get("thrown"),
                         "%s/%s threw: %s" % (target, case, json.dumps(r)))
        return r

    def assert_usage(self, usage, completion_tokens, prompt_tokens=None):
        self.assertEqual(usage["completion_tokens"], completion_tokens, usage)
        self.assertGreater(usage["prompt_tokens"], 0, usage)
        if prompt_tokens is not None:
            self.assertEqual(usage["prompt_tokens"], prompt_tokens, usage)
        self.assertEqual(usage["total_tokens"], usage["prompt_tokens"] + completion_tokens, usage)

    def assert_bad_request(self, err, param_word):
        self.assertTrue(err.get("thrown"), err)
        self.assertEqual(err["class"], "BadRequestError", err)
        self.assertTrue(err["is_bad_request"] and err["is_api_error"], err)
        self.assertEqual(err["status"], 400, err)
        # An OpenAI-style body: {"error": {"message", "type", "param", "code"}}.
        self.assertIsInstance(err["error"], dict, err)
        self.assertTrue(err["error"].get("message"), err)
        self.assertTrue(err["error"].get("type"), err)
        self.assertEqual(err["error"].get("code"), 400, err)
        self.assertEqual(err["code"], 400, err)
        self.assertIn(param_word, err["param"] or "", err)
        self.assertTrue(err["message"].startswith("400 "), err)

    def each_proxy(self):
        for target in ("seq", "agg", "seqtok", "aggtok"):
            with self.subTest(target=target):
                yield target

    def reference(self, target, case):
        """The prompt token count an engine reports for `case` without the proxy: the sims
        behind the tokenizing locations tokenize with the same tokenizer as the proxy."""
        direct = "directtok" if target.endswith("tok") else "direct"
        return self.result(direct, case)["usage"]["prompt_tokens"]

    # --- tests ------------------------------------------------------------------------------

    def test_reference_run_against_omni_sim_directly(self):
        # The script itself works: against omni-sim with no nginx, everything succeeds.
        for direct in ("direct", "directtok"):
            for case in ("chat", "chat_stream", "chat_stream_default_length", "completion",
                         "completion_stream"):
                self.result(direct, case)
            self.assert_bad_request(self.out[direct]["missing_messages"], "messages")


    def test_chat_completion(self):
        for t in self.each_proxy():
            ref = self.reference(t, "chat")
            r = self.result(t, "chat")
            self.assertEqual(r["object"], "chat.completion")
            # Both legs of the sequential mode carried the client's X-Request-Id.
            self.assertEqual(r["id"], "chatcmpl-sdk-%s-chat" % t)
            self.assertEqual(r["request_id"], "sdk-%s-chat" % t)
            self.assertEqual(r["model"], "omni-sim")
            self.assertEqual(len(r["choices"]), 1, r)
            c = r["choices"][0]
            self.assertEqual((c["index"], c["role"], c["finish_reason"]),
                             (0, "assistant", "length"))
            self.assertIsInstance(c["content"], str)
            self.assertTrue(c["content"].strip(), r)
            self.assert_usage(r["usage"], MAX_TOKENS, ref)

    def test_chat_completion_streamed(self):
        for t in self.each_proxy():
            r = self.result(t, "chat_stream")
            # A role chunk, one chunk per token, then the usage chunk.
            self.assertEqual(r["chunks"], MAX_TOKENS + 2, r)
            self.assertEqual(r["choice_chunks"], MAX_TOKENS + 1, r)
            self.assertEqual(r["content_chunks"], MAX_TOKENS, r)
            self.assertEqual(r["roles"], ["assistant"], r)
            self.assertEqual(r["finish_reasons"], ["length"], r)
            self.assertEqual(set(r["indices"]), {0}, r)
            self.assertEqual(r["ids"], ["chatcmpl-sdk-%s-chat-stream" % t], r)
            self.assertEqual(r["objects"], ["chat.completion.chunk"], r)
            self.assertTrue(r["text"].strip(), r)
            self.assertEqual(r["usage_chunks"], 1, r)
            self.assert_usage(r["usage"], MAX_TOKENS)

    def test_chat_streamed_without_max_tokens_stops_by_itself(self):
        for t in self.each_proxy():
            r = self.result(t, "chat_stream_default_length")
            n = r["usage"]["completion_tokens"]
            self.assertGreaterEqual(n, 1, r)
            self.assertLessEqual(n, DEFAULT_MAX_TOKENS, r)
            self.assertEqual(r["finish_reasons"], ["stop"], r)
            self.assertEqual(r["content_chunks"], n, r)
            self.assertEqual(r["chunks"], n + 2, r)
            self.assert_usage(r["usage"], n)

    def test_completion(self):
        for t in self.each_proxy():
            ref = self.reference(t, "completion")
            r = self.result(t, "completion")
            self.assertEqual(r["object"], "text_completion")
            self.assertEqual(r["id"], "cmpl-sdk-%s-cmpl" % t)
            self.assertEqual(r["request_id"], "sdk-%s-cmpl" % t)
            self.assertEqual(len(r["choices"]), 1, r)
            c = r["choices"][0]
            self.assertEqual((c["index"], c["finish_reason"]), (0, "length"))
            self.assertTrue(c["text"].strip(), r)
            self.assert_usage(r["usage"], MAX_TOKENS, ref)

    def test_completion_streamed(self):
        for t in self.each_proxy():
            r = self.result(t, "completion_stream")
            # One chunk per token, then the usage chunk; the prompt is 5 token ids.
            self.assertEqual(r["chunks"], MAX_TOKENS + 1, r)
            self.assertEqual(r["choice_chunks"], MAX_TOKENS, r)
            self.assertEqual(r["text_chunks"], MAX_TOKENS, r)
            self.assertEqual(r["finish_reasons"], ["length"], r)
            self.assertEqual(set(r["indices"]), {0}, r)
            self.assertEqual(r["ids"], ["cmpl-sdk-%s-cmpl-stream" % t], r)
            self.assertEqual(r["usage_chunks"], 1, r)
            self.assert_usage(r["usage"], MAX_TOKENS, 5)

    def test_missing_messages_is_bad_request(self):
        for t in self.each_proxy():
            self.assert_bad_request(self.out[t]["missing_messages"], "messages")
            self.assert_bad_request(self.out[t]["missing_messages_stream"], "messages")

    def test_zero_max_tokens_is_bad_request(self):
        for t in self.each_proxy():
            self.assert_bad_request(self.out[t]["zero_max_tokens"], "max_tokens")

    def test_unknown_model_is_not_found(self):
        for t in self.each_proxy():
            err = self.out[t]["unknown_model"]
            self.assertTrue(err.get("thrown"), err)
            self.assertEqual(err["class"], "NotFoundError", err)
            self.assertEqual(err["status"], 404, err)
            self.assertIn("does not exist", err["message"], err)
            self.assertEqual(err["error"]["code"], 404, err)


if __name__ == "__main__":
    unittest.main()
