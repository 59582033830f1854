#!/usr/bin/env python3
"""Every request parameter the node accepts or refuses, through the official `openai` package.

Usage: openai_params.py BASE_URL MODEL MAX_CONTEXT

Meant for a node serving a synthetic model (`tiny-hybrid`: one token per byte, so token ids are
byte values and `logit_bias` can force a known answer). Checks, for chat and completions:
logprobs / top_logprobs (stream and non-stream), logit_bias (forces a known answer), presence /
frequency / repetition penalties, min_p, top_k, seed (reproducible), stop; 400s with the right `param` for what is not supported;
`context_length_exceeded`; and that `X-Request-Id` is echoed and used as the completion id.
Exits non-zero on the first failure.
"""

import sys

try:
    import openai
    from openai import OpenAI
except ImportError:
    print("error: the `openai` package is not installed (pip install openai)", file=sys.stderr)
    sys.exit(2)


def fail(message: str) -> None:
    print(f"FAIL: {message}", file=sys.stderr)
    sys.exit(1)


def check(cond: bool, message: str) -> None:
    if not cond:
        fail(message)


def refused(param: str, call) -> None:
    """`call` must raise a 400 naming `param`."""
    try:
        call()
    except openai.BadRequestError as e:
        body = e.body or {}
        got = body.get("param") if isinstance(body, dict) else None
        check(got == param, f"400 for {param} names param={got!r}: {body}")
        print(f"refused {param}: {body.get('message')}")
        return
    fail(f"{param}: expected a 400, the request was accepted")


def main() -> None:
    if len(sys.argv) < 4:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    base = sys.argv[1].rstrip("/")
    if not base.endswith("/v1"):
        base += "/v1"
    model, max_context = sys.argv[2], int(sys.argv[3])
    client = OpenAI(base_url=base, api_key="prfaas", timeout=300.0, max_retries=0)
    msgs = [{"role": "user", "content": "Say something."}]

    # logprobs (chat, non-stream): one entry per generated token, k alternatives each.
    r = client.chat.completions.create(
        model=model, messages=msgs, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3
    )
    lp = r.choices[0].logprobs
    check(lp is not None and lp.content, f"chat logprobs missing: {r}")
    check(len(lp.content) == r.usage.completion_tokens or r.choices[0].finish_reason == "stop",
          f"{len(lp.content)} logprob entries for {r.usage.completion_tokens} tokens")
    for t in lp.content:
        check(t.logprob <= 0.0 and len(t.top_logprobs) == 3, f"bad entry {t}")
        check(t.top_logprobs[0].logprob >= t.top_logprobs[-1].logprob, "alternatives not sorted")
        check(t.logprob <= t.top_logprobs[0].logprob + 1e-5, "greedy pick below the best one")
    check("".join(t.token for t in lp.content) == r.choices[0].message.content,
          "logprob tokens do not spell the answer")

    # logprobs (chat, stream).
    stream = client.chat.completions.create(
        model=model, messages=msgs, max_tokens=4, temperature=0, logprobs=True, top_logprobs=1,
        stream=True,
    )
    streamed = [t for c in stream for ch in c.choices if ch.logprobs for t in ch.logprobs.content]
    check([t.token for t in streamed] == [t.token for t in lp.content],
          f"streamed logprobs differ: {streamed} vs {lp.content}")

    # logprobs (completions, non-stream and stream).
    r = client.completions.create(model=model, prompt="abc", max_tokens=3, temperature=0,
                                  logprobs=2)
    tl = r.choices[0].logprobs
    check(tl is not None and len(tl.tokens) == len(tl.token_logprobs) == len(tl.top_logprobs)
          == len(tl.text_offset) > 0, f"completions logprobs malformed: {tl}")
    check(all(len(d) <= 2 for d in tl.top_logprobs), "more alternatives than asked for")
    stream = client.completions.create(model=model, prompt="abc", max_tokens=3, temperature=0,
                                       logprobs=2, stream=True)
    toks = [t for c in stream for ch in c.choices if ch.logprobs for t in ch.logprobs.tokens]
    check(toks == tl.tokens, f"streamed completion logprobs differ: {toks} vs {tl.tokens}")

    # logit_bias forces a token (ids are bytes here: 65 = "A").
    r = client.completions.create(model=model, prompt="x", max_tokens=3, temperature=0,
                                  logit_bias={"65": 100})
    check(r.choices[0].text == "AAA", f"logit_bias ignored: {r.choices[0].text!r}")
    # Penalties are accepted (their effect is checked token by token in the sampler's tests).
    for extra in ({"frequency_penalty": 1.5}, {"presence_penalty": -1.0}):
        r = client.completions.create(model=model, prompt="x", max_tokens=3, temperature=0,
                                      **extra)
        check(r.usage.completion_tokens > 0, f"{extra}: {r}")
    r = client.completions.create(model=model, prompt="x", max_tokens=3, temperature=0,
                                  extra_body={"repetition_penalty": 1.3})
    check(r.usage.completion_tokens > 0, f"repetition_penalty: {r}")

    # Sampling knobs are accepted and seeded sampling is reproducible.
    kw = dict(model=model, messages=msgs, max_tokens=6, temperature=1.0, top_p=0.9, seed=7,
              stop=["\n\n"], user="t", extra_body={"min_p": 0.05, "top_k": 20})
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    check(a == b, f"same seed, different answers: {a!r} vs {b!r}")

    # X-Request-Id: echoed and used as the completion id.
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=msgs, max_tokens=1, extra_headers={"X-Request-Id": "req-abc-123"}
    )
    check(raw.headers.get("x-request-id") == "req-abc-123", f"headers: {raw.headers}")
    check(raw.parse().id == "chatcmpl-req-abc-123", f"id: {raw.parse().id}")
    raw = client.completions.with_raw_response.create(model=model, prompt="x", max_tokens=1)
    check(bool(raw.headers.get("x-request-id")), "no X-Request-Id made up")

    # Refused with the parameter named.
    refused("n", lambda: client.chat.completions.create(model=model, messages=msgs, n=2))
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    refused("tools", lambda: client.chat.completions.create(model=model, messages=msgs,
                                                            tools=tools))
    refused("response_format", lambda: client.chat.completions.create(
        model=model, messages=msgs, response_format={"type": "json_object"}))
    refused("echo", lambda: client.completions.create(model=model, prompt="x", echo=True))
    refused("suffix", lambda: client.completions.create(model=model, prompt="x", suffix="y"))
    refused("best_of", lambda: client.completions.create(model=model, prompt="x", best_of=2))
    refused("top_logprobs", lambda: client.chat.completions.create(
        model=model, messages=msgs, top_logprobs=2))
    refused("logit_bias", lambda: client.completions.create(
        model=model, prompt="x", logit_bias={"99999999": 1}))
    refused("presence_penalty", lambda: client.chat.completions.create(
        model=model, messages=msgs, presence_penalty=3))

    # context_length_exceeded: a prompt that leaves no room for max_tokens.
    try:
        client.completions.create(model=model, prompt="y" * (max_context - 2), max_tokens=8)
        fail("an over-long request was accepted")
    except openai.BadRequestError as e:
        check(e.code == "context_length_exceeded", f"code: {e.code} {e.body}")
    # No max_tokens: whatever fits (here 4 tokens) instead of a refusal.
    r = client.completions.create(model=model, prompt="y" * (max_context - 4), temperature=0)
    check(r.usage.completion_tokens <= 4, f"generated past the context: {r.usage}")
    print("OK")


if __name__ == "__main__":
    main()
