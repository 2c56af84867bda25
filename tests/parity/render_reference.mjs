// Renders chat templates with the reference renderer, @huggingface/jinja, for the parity tests
// of omni::jinja (src/jinja.cpp).
//
// Input (stdin): JSON Lines, one object per line:
//   {"template": "<source>", "context": {...}, "now_epoch_seconds": 1700000000}
// "now_epoch_seconds" is optional: when given, strftime_now() sees that time (as the C++
// RenderOptions::now_epoch_seconds does); otherwise the current time.
// Output (stdout): one JSON line per input line, in order:
//   {"ok": true, "text": "<rendered>"}  or  {"ok": false, "error": "<message>"}
// A line that is not valid JSON gives {"ok": false, "error": "bad input line: ..."}; blank
// lines are skipped (no output line).
//
// The environment is pinned to what the C++ renderer implements: times are formatted in UTC
// and month names in English (the reference uses the process's time zone and default locale).
// Run from the repository root (or anywhere below it) so that node_modules resolves.
import { createInterface } from "node:readline";
import { Template } from "@huggingface/jinja";

process.env.TZ = "UTC";

const RealDate = Date;
const RealDateTimeFormat = Intl.DateTimeFormat;
let fixedNowMs = null;

// new Date() with no arguments returns the injected time when there is one.
globalThis.Date = class extends RealDate {
  constructor(...args) {
    if (args.length === 0 && fixedNowMs !== null) {
      super(fixedNowMs);
    } else {
      super(...args);
    }
  }
  static now() {
    return fixedNowMs !== null ? fixedNowMs : RealDate.now();
  }
};
// Month names in English whatever the machine's locale.
Intl.DateTimeFormat = function (locale, options) {
  return new RealDateTimeFormat("en-US", { ...options, timeZone: "UTC" });
};

const rl = createInterface({ input: process.stdin, crlfDelay: Infinity, terminal: false });
const out = [];
const flush = () => {
  if (out.length) {
    process.stdout.write(out.join(""));
    out.length = 0;
  }
};

rl.on("line", (line) => {
  if (line.trim() === "") return;
  let result;
  try {
    const input = JSON.parse(line);
    fixedNowMs =
      typeof input.now_epoch_seconds === "number" && input.now_epoch_seconds !== 0
        ? input.now_epoch_seconds * 1000
        : null;
    try {
      const text = new Template(input.template).render(input.context ?? {});
      result = { ok: true, text };
    } catch (e) {
      result = { ok: false, error: e instanceof Error ? e.message : String(e) };
    }
  } catch (e) {
    result = { ok: false, error: `bad input line: ${e instanceof Error ? e.message : String(e)}` };
  }
  out.push(JSON.stringify(result) + "\n");
  if (out.length >= 256) flush();
});
rl.on("close", flush);
