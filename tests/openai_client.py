"""The real `openai` client against `gpt2 serve` (run by tests/serve.rs): completions, streaming,
n > 1 and logprobs. Prints one JSON object of what it got; the Rust test compares it with
`gpt2 generate`. Usage: openai_client.py BASE_URL API_KEY"""

import json
import sys

import openai

base_url, key = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=300)
model = client.models.list().data[0].id
prompt = "The cat sat"

greedy = client.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0)
streamed = ["" for _ in range(1)]
for chunk in client.completions.create(
    model=model, prompt=prompt, max_tokens=10, temperature=0, stream=True
):
    for c in chunk.choices:
        streamed[c.index] += c.text
# generate's default top-k (50) is sent as an extra field: OpenAI samples from every token.
seeded = client.completions.create(
    model=model, prompt=prompt, max_tokens=10, temperature=0.9, seed=3, n=2,
    extra_body={"top_k": 50},
)
with_logprobs = client.completions.create(
    model=model, prompt=prompt, max_tokens=10, temperature=0, logprobs=2
)
try:
    openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0).models.list()
    unauthorized = 200
except openai.AuthenticationError as e:
    unauthorized = e.status_code

print(json.dumps({
    "greedy": [c.text for c in greedy.choices],
    "streamed": streamed,
    "seeded": [c.text for c in sorted(seeded.choices, key=lambda c: c.index)],
    "logprobs_tokens": len(with_logprobs.choices[0].logprobs.tokens),
    "unauthorized": unauthorized,
}))
