//! `gpt2 serve`, the real binary on a port the OS picks: the same text as `gpt2 generate`
//! (greedy, seeded, several choices, attention, ablation), many clients at once, and every way
//! a request or a client can go wrong.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{Result, Server};
use serde_json::{json, Value};

/// `generate --json` on the fixture `name` with `args`: each sample's completion text.
fn generate(name: &str, args: &[&str]) -> Result<Vec<String>> {
    Ok(common::generate_json(&common::fixture(name), args)?
        .iter()
        .map(|v| v["completion"].as_str().unwrap_or_default().to_string())
        .collect())
}

/// The `text` of every choice of a completion response (asserting a 200).
fn texts(status: u16, v: &Value) -> Vec<String> {
    assert_eq!(status, 200, "{v}");
    v["choices"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| c["text"].as_str().unwrap_or_default().to_string())
        .collect()
}

const PROMPTS: [&str; 3] = ["The cat sat on", "Hello, world", ""];

#[test]
fn greedy_and_seeded_completions_are_what_generate_prints() -> Result {
    let server = Server::start("tiny", &[])?;
    for prompt in PROMPTS {
        // Greedy.
        let want = generate(
            "tiny",
            &["--prompt", prompt, "-n", "20", "--temperature", "0"],
        )?;
        let (status, v) = server.post(
            "/v1/completions",
            &json!({"prompt": prompt, "max_tokens": 20, "temperature": 0}),
        )?;
        assert_eq!(texts(status, &v), want, "greedy {prompt:?}");
        assert_eq!(v["object"], "text_completion");
        let usage = &v["usage"];
        assert_eq!(
            usage["total_tokens"].as_u64(),
            Some(
                usage["prompt_tokens"].as_u64().unwrap_or(0)
                    + usage["completion_tokens"].as_u64().unwrap_or(0)
            )
        );
        // Seeded, with generate's default top-k (50) sent along.
        let want = generate(
            "tiny",
            &[
                "--prompt",
                prompt,
                "-n",
                "20",
                "--temperature",
                "0.9",
                "--seed",
                "5",
            ],
        )?;
        let (status, v) = server.post(
            "/v1/completions",
            &json!({"prompt": prompt, "max_tokens": 20, "temperature": 0.9, "seed": 5, "top_k": 50}),
        )?;
        assert_eq!(texts(status, &v), want, "seeded {prompt:?}");
        // No top_k (OpenAI: every token) is generate's --top-k at or past the vocabulary.
        let want = generate(
            "tiny",
            &[
                "--prompt",
                prompt,
                "-n",
                "20",
                "--temperature",
                "1",
                "--seed",
                "11",
                "--top-k",
                "100000",
            ],
        )?;
        let (status, v) = server.post(
            "/v1/completions",
            &json!({"prompt": prompt, "max_tokens": 20, "seed": 11}),
        )?;
        assert_eq!(texts(status, &v), want, "all tokens {prompt:?}");
    }
    // Byte for byte what `generate` prints (the prompt, then the completion).
    let dir = common::fixture("tiny");
    let out = common::gpt2(&[
        "generate",
        "--model-dir",
        dir.to_str().ok_or("path")?,
        "--prompt",
        "The cat",
        "-n",
        "12",
        "--temperature",
        "0",
    ])?;
    assert!(out.status.success(), "{}", common::stderr(&out));
    let (status, v) = server.post(
        "/v1/completions",
        &json!({"prompt": "The cat", "max_tokens": 12, "temperature": 0, "echo": true}),
    )?;
    assert_eq!(
        format!("{}\n", texts(status, &v)[0]).as_bytes(),
        out.stdout.as_slice()
    );
    Ok(())
}

#[test]
fn n_choices_and_several_prompts_are_generate_s_samples() -> Result {
    let server = Server::start("tiny", &[])?;
    let want = generate(
        "tiny",
        &[
            "--prompt",
            "Once upon",
            "-n",
            "15",
            "--temperature",
            "0.8",
            "--seed",
            "9",
            "--num-samples",
            "3",
        ],
    )?;
    assert_eq!(want.len(), 3);
    let body = json!({"prompt": "Once upon", "max_tokens": 15, "temperature": 0.8, "seed": 9, "n": 3, "top_k": 50});
    let (status, v) = server.post("/v1/completions", &body)?;
    assert_eq!(texts(status, &v), want);
    // Streamed, the same choices.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let chunks = server.stream("/v1/completions", &streamed)?;
    assert_eq!(chunks.last(), Some(&json!("[DONE]")));
    assert_eq!(common::streamed_texts(&chunks, 3), want);
    // Two prompts, two choices each: prompt-major.
    let other = generate(
        "tiny",
        &[
            "--prompt",
            "The end",
            "-n",
            "15",
            "--temperature",
            "0.8",
            "--seed",
            "9",
            "--num-samples",
            "2",
        ],
    )?;
    let (status, v) = server.post(
        "/v1/completions",
        &json!({"prompt": ["Once upon", "The end"], "max_tokens": 15, "temperature": 0.8, "seed": 9, "n": 2, "top_k": 50}),
    )?;
    let got = texts(status, &v);
    assert_eq!(got, [&want[..2], &other[..]].concat());
    Ok(())
}

#[test]
fn token_id_prompts_and_logprobs() -> Result {
    let server = Server::start("tiny", &[])?;
    let (_, tok) = server.post("/tokenize", &json!({"content": "The cat sat"}))?;
    let ids = tok["tokens"].clone();
    assert!(ids.as_array().is_some_and(|a| !a.is_empty()), "{tok}");
    let (status, back) = server.post("/detokenize", &json!({"tokens": ids}))?;
    assert_eq!(
        (status, back["content"].as_str()),
        (200, Some("The cat sat"))
    );
    let by_text = server.post(
        "/v1/completions",
        &json!({"prompt": "The cat sat", "max_tokens": 8, "temperature": 0}),
    )?;
    let by_ids = server.post(
        "/v1/completions",
        &json!({"prompt": ids, "max_tokens": 8, "temperature": 0}),
    )?;
    assert_eq!(texts(by_text.0, &by_text.1), texts(by_ids.0, &by_ids.1));
    let (status, v) = server.post(
        "/v1/completions",
        &json!({"prompt": "The cat sat", "max_tokens": 5, "temperature": 0, "logprobs": 3, "echo": true}),
    )?;
    assert_eq!(status, 200, "{v}");
    let lp = &v["choices"][0]["logprobs"];
    let n_prompt = tok["tokens"].as_array().map_or(0, Vec::len);
    let tokens = lp["tokens"].as_array().ok_or("tokens")?;
    assert_eq!(tokens.len(), n_prompt + 5);
    assert!(
        lp["token_logprobs"][0].is_null(),
        "nothing predicts the first token"
    );
    let joined: String = tokens.iter().filter_map(Value::as_str).collect();
    assert_eq!(joined, v["choices"][0]["text"].as_str().unwrap_or_default());
    for i in n_prompt..n_prompt + 5 {
        let top = lp["top_logprobs"][i].as_object().ok_or("top")?;
        assert!(!top.is_empty() && top.len() <= 3);
        // Greedy: the chosen token is the most likely.
        let best = top
            .values()
            .filter_map(Value::as_f64)
            .fold(f64::MIN, f64::max);
        assert_eq!(lp["token_logprobs"][i].as_f64(), Some(best), "{lp}");
    }
    Ok(())
}

/// `generate --attention-out F.json --layer L`'s `layers`.
fn attention_out(prompt: &str, layer: &str, extra: &[&str]) -> Result<(Value, String)> {
    let out_dir = common::scratch("serve", &format!("attention-{layer}"));
    let file = out_dir.join("attn.json");
    let dir = common::fixture("induction");
    let mut args = vec![
        "generate",
        "--model-dir",
        dir.to_str().ok_or("path")?,
        "--prompt",
        prompt,
        "-n",
        "6",
        "--temperature",
        "0",
        "--json",
        "--layer",
        layer,
        "--attention-out",
        file.to_str().ok_or("path")?,
    ];
    args.extend_from_slice(extra);
    let out = common::gpt2(&args)?;
    assert!(out.status.success(), "{}", common::stderr(&out));
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&file)?)?;
    let line: Value =
        serde_json::from_slice(out.stdout.split(|&b| b == b'\n').next().ok_or("line")?)?;
    Ok((
        v["layers"].clone(),
        line["completion"].as_str().unwrap_or_default().to_string(),
    ))
}

#[test]
fn attention_and_ablation_are_generate_s() -> Result {
    let server = Server::start("induction", &[])?;
    let prompt = "abcdefabc";
    for layer in ["1", "all"] {
        let (want, _) = attention_out(prompt, layer, &[])?;
        let layers = if layer == "all" {
            json!("all")
        } else {
            json!([1])
        };
        let body = json!({"prompt": prompt, "max_tokens": 6, "temperature": 0, "attention": {"layers": layers}});
        let (status, v) = server.post("/v1/completions", &body)?;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["choices"][0]["attention"], want, "layer {layer}");
        // Streamed: each token's chunk carries its own step.
        let mut streamed = body.clone();
        streamed["stream"] = json!(true);
        let chunks = server.stream("/v1/completions", &streamed)?;
        let steps: Vec<Value> = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["attention"].as_array().cloned())
            .map(|layers| Value::Array(layers.iter().map(|l| l["steps"][0].clone()).collect()))
            .collect();
        let want_steps: Vec<Value> = (0..6)
            .map(|i| {
                Value::Array(
                    want.as_array()
                        .into_iter()
                        .flatten()
                        .map(|l| l["steps"][i].clone())
                        .collect(),
                )
            })
            .collect();
        assert_eq!(steps, want_steps, "streamed layer {layer}");
    }
    // Heads filtered: head 1 of layer 1 only.
    let (want, _) = attention_out(prompt, "1", &[])?;
    let (status, v) = server.post(
        "/v1/completions",
        &json!({"prompt": prompt, "max_tokens": 6, "temperature": 0, "attention": {"layers": [1], "heads": [1]}}),
    )?;
    assert_eq!(status, 200, "{v}");
    let steps = v["choices"][0]["attention"][0]["steps"]
        .as_array()
        .ok_or("steps")?;
    for (i, s) in steps.iter().enumerate() {
        assert_eq!(s, &json!([want[0]["steps"][i][1]]));
    }
    // Ablation, both modes.
    for mode in ["zero", "mean"] {
        let (_, want) =
            attention_out(prompt, "1", &["--ablate", "1.0,1.1", "--ablate-mode", mode])?;
        let (status, v) = server.post(
            "/v1/completions",
            &json!({"prompt": prompt, "max_tokens": 6, "temperature": 0, "ablate": ["1.0", "1.1"], "ablate_mode": mode}),
        )?;
        assert_eq!(texts(status, &v), vec![want], "ablate {mode}");
    }
    Ok(())
}

#[test]
fn sixty_four_streaming_clients_all_finish_with_their_sequential_text() -> Result {
    let server = Server::start("tiny", &["--parallel", "16", "--max-queue", "128"])?;
    let body = |i: usize| {
        let greedy = i.is_multiple_of(2);
        json!({
            "prompt": format!("client {i} says"),
            "max_tokens": 12 + i % 5,
            "temperature": if greedy { 0.0 } else { 0.9 },
            "seed": i,
            "stream": true,
        })
    };
    // Alone, one after the other.
    let want: Vec<String> = (0..64)
        .map(|i| {
            Ok(common::streamed_texts(&server.stream("/v1/completions", &body(i))?, 1).remove(0))
        })
        .collect::<Result<_>>()?;
    // All at once.
    let got: Vec<Result<String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..64)
            .map(|i| {
                let server = &server;
                let body = body(i);
                s.spawn(move || -> std::result::Result<String, String> {
                    let chunks = server
                        .stream("/v1/completions", &body)
                        .map_err(|e| e.to_string())?;
                    if chunks.last() != Some(&json!("[DONE]")) {
                        return Err(format!("client {i} got no [DONE]"));
                    }
                    Ok(common::streamed_texts(&chunks, 1).remove(0))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| match h.join() {
                Ok(r) => r.map_err(Into::into),
                Err(_) => Err("client thread panicked".into()),
            })
            .collect()
    });
    for (i, (got, want)) in got.into_iter().zip(&want).enumerate() {
        assert_eq!(&got?, want, "client {i}");
    }
    Ok(())
}

#[test]
fn bad_requests_get_openai_errors_and_the_server_stays_up() -> Result {
    let server = Server::start("tiny", &["--max-body", "2000", "--parallel", "4"])?;
    let check = |status: u16, body: &str, want: u16, param: Option<&str>| -> Result {
        let v: Value = serde_json::from_str(body).map_err(|e| format!("{e}: {body}"))?;
        assert_eq!(status, want, "{v}");
        let e = &v["error"];
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        assert!(e["type"].is_string(), "{v}");
        assert!(
            e.as_object()
                .is_some_and(|o| o.contains_key("param") && o.contains_key("code")),
            "{v}"
        );
        if let Some(p) = param {
            assert_eq!(e["param"], p, "{v}");
        }
        Ok(())
    };
    let raw = |body: &str| server.request("POST", "/v1/completions", Some(body), &[]);
    let (s, b) = raw("{\"prompt\": \"a\",")?;
    check(s, &b, 400, None)?;
    let (s, b) = raw("[1, 2]")?;
    check(s, &b, 400, None)?;
    for (body, param) in [
        (json!({"prompt": "a", "max_tokens": "ten"}), "max_tokens"),
        (json!({"prompt": 5}), "prompt"),
        (json!({"prompt": "a", "stream": "yes"}), "stream"),
        (json!({"prompt": "a", "stop": 3}), "stop"),
        (json!({"prompt": "a", "temperature": [1]}), "temperature"),
        (json!({"prompt": "a", "max_tokens": -5}), "max_tokens"),
        (
            json!({"prompt": "a", "max_tokens": 100000000}),
            "max_tokens",
        ),
        (json!({"prompt": "a", "n": 5}), "n"),
        (json!({"prompt": "a", "n": 1000}), "n"),
        (json!({"prompt": "a ".repeat(300)}), "prompt"),
        (json!({"prompt": [600]}), "prompt"),
        (json!({"prompt": "a", "logprobs": 50}), "logprobs"),
        (json!({"prompt": "a", "logprobs": 1.5}), "logprobs"),
    ] {
        let (s, b) = raw(&body.to_string())?;
        check(s, &b, 400, Some(param))?;
    }
    // Unknown fields are ignored.
    let (s, v) = server.post(
        "/v1/completions",
        &json!({"prompt": "a", "max_tokens": 2, "frobnicate": 1, "user": "u"}),
    )?;
    assert_eq!(s, 200, "{v}");
    // Over --max-body.
    let big = json!({"prompt": "x".repeat(5000)}).to_string();
    let (s, b) = raw(&big)?;
    check(s, &b, 413, None)?;
    // Chat without a template.
    let (s, b) = server.request(
        "POST",
        "/v1/chat/completions",
        Some(&json!({"messages": [{"role": "user", "content": "hi"}]}).to_string()),
        &[],
    )?;
    check(s, &b, 400, None)?;
    assert!(b.contains("chat template"), "{b}");
    let (s, b) = server.get("/nowhere")?;
    check(s, &b, 404, None)?;
    // Still serving.
    let (s, _) = server.get("/health")?;
    assert_eq!(s, 200);
    let errors = server.metric("gpt2_requests_total{status=\"400\"}")?;
    assert!(errors >= 14.0, "{errors}");
    Ok(())
}

#[test]
fn the_api_key_guards_everything_but_health_and_is_never_shown() -> Result {
    let key = "sekrit-key-123";
    let server = Server::start_with_env("tiny", &[], &[("GPT2_API_KEY", key)])?;
    let body = json!({"prompt": "a", "max_tokens": 2}).to_string();
    for headers in [
        vec![],
        vec![("Authorization", "Bearer nope-xyz")],
        vec![("Authorization", key)],
    ] {
        for (method, path) in [
            ("POST", "/v1/completions"),
            ("GET", "/v1/models"),
            ("POST", "/tokenize"),
            ("GET", "/metrics"),
        ] {
            let (s, b) = server.request(
                method,
                path,
                (method == "POST").then_some(body.as_str()),
                &headers,
            )?;
            assert_eq!(s, 401, "{path} {headers:?}: {b}");
            assert!(!b.contains(key) && !b.contains("nope-xyz"), "{b}");
        }
    }
    let bearer = format!("Bearer {key}");
    let (s, b) = server.request(
        "POST",
        "/v1/completions",
        Some(&body),
        &[("Authorization", &bearer)],
    )?;
    assert_eq!(s, 200, "{b}");
    let (s, _) = server.get("/health")?;
    assert_eq!(s, 200);
    assert!(!server.log().contains(key), "{}", server.log());
    Ok(())
}

#[test]
fn listening_beyond_loopback_without_a_key_warns() -> Result {
    let open = Server::start("tiny", &["--host", "0.0.0.0"])?;
    assert!(
        open.log().contains("warning: listening on 0.0.0.0:"),
        "{}",
        open.log()
    );
    let keyed = Server::start("tiny", &["--host", "0.0.0.0", "--api-key", "k"])?;
    assert!(!keyed.log().contains("warning"), "{}", keyed.log());
    let local = Server::start("tiny", &[])?;
    assert!(!local.log().contains("warning"), "{}", local.log());
    // A port in use is one error line, before any loading.
    let out = common::gpt2(&[
        "serve",
        "--config",
        "configs/gpt2.json",
        "--port",
        local.addr.rsplit(':').next().unwrap_or("0"),
    ])?;
    common::assert_error(&out, 1, &["cannot listen on"]);
    Ok(())
}

#[test]
fn small_endpoints() -> Result {
    let server = Server::start("tiny", &[])?;
    let (s, b) = server.get("/health")?;
    assert_eq!(
        (s, serde_json::from_str::<Value>(&b)?),
        (200, json!({"status": "ok"}))
    );
    let (s, b) = server.get("/v1/models")?;
    let v: Value = serde_json::from_str(&b)?;
    assert_eq!(s, 200);
    assert_eq!(v["data"][0]["object"], "model");
    let (s, v) = server.post("/tokenize", &json!({"prompt": "Hello"}))?;
    assert_eq!(s, 200);
    let (s, v) = server.post("/detokenize", &v)?;
    assert_eq!((s, v["content"].as_str()), (200, Some("Hello")));
    let (s, v) = server.post("/detokenize", &json!({"tokens": [100000]}))?;
    assert_eq!((s, v["error"]["param"].as_str()), (400, Some("tokens")));
    server.post("/v1/completions", &json!({"prompt": "a", "max_tokens": 3}))?;
    let (s, text) = server.get("/metrics")?;
    assert_eq!(s, 200);
    for name in [
        "gpt2_requests_total{status=\"200\"}",
        "gpt2_prompt_tokens_total",
        "gpt2_generated_tokens_total",
        "gpt2_queue_depth",
        "gpt2_active_sequences",
        "gpt2_prefill_tokens_per_second",
        "gpt2_decode_tokens_per_second",
        "gpt2_kv_cache_bytes",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(name)),
            "{name} missing: {text}"
        );
    }
    assert!(server.metric("gpt2_generated_tokens_total")? >= 3.0);
    let (s, page) = server.get("/")?;
    assert_eq!(s, 200);
    assert!(page.contains("<script>") && !page.contains("http://") && !page.contains("https://"));
    Ok(())
}

#[test]
fn a_chat_template_makes_chat_completions() -> Result {
    let dir = common::scratch("serve", "chat");
    let template = dir.join("chat.json");
    std::fs::write(
        &template,
        r#"{"message": "{role}: {content}\n", "generation": "assistant:", "stop": ["\n"]}"#,
    )?;
    let server = Server::start(
        "tiny",
        &["--chat-template", template.to_str().ok_or("path")?],
    )?;
    let messages = json!([{"role": "user", "content": "Hi there"}]);
    let (s, v) = server.post(
        "/v1/chat/completions",
        &json!({"messages": messages, "max_tokens": 10, "temperature": 0}),
    )?;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    let (_, c) = server.post(
        "/v1/completions",
        &json!({"prompt": "user: Hi there\nassistant:", "max_tokens": 10, "temperature": 0, "stop": ["\n"]}),
    )?;
    assert_eq!(
        v["choices"][0]["message"]["content"],
        c["choices"][0]["text"]
    );
    let chunks = server.stream(
        "/v1/chat/completions",
        &json!({"messages": messages, "max_tokens": 10, "temperature": 0, "stream": true}),
    )?;
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(json!(text), c["choices"][0]["text"]);
    assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    // Chat's logprobs: one entry per generated token, with its alternatives.
    let (s, v) = server.post(
        "/v1/chat/completions",
        &json!({"messages": messages, "max_tokens": 4, "temperature": 0, "ignore_eos": true, "logprobs": true, "top_logprobs": 2}),
    )?;
    assert_eq!(s, 200, "{v}");
    let content = v["choices"][0]["logprobs"]["content"]
        .as_array()
        .ok_or("content")?;
    assert_eq!(
        content.len() as u64,
        v["usage"]["completion_tokens"].as_u64().unwrap_or(0)
    );
    assert!(
        content
            .iter()
            .all(|e| e["top_logprobs"].as_array().is_some_and(|t| t.len() == 2)),
        "{v}"
    );
    Ok(())
}

#[test]
fn bad_server_options_are_usage_errors() -> Result {
    let dir = common::scratch("serve", "options");
    let bad_template = dir.join("chat.json");
    std::fs::write(&bad_template, r#"{"message": "no content here"}"#)?;
    let tiny = common::fixture("tiny");
    let tiny = tiny.to_str().ok_or("path")?;
    for (args, needle) in [
        (vec!["--timeout", "0"], "--timeout"),
        (vec!["--idle-timeout", "-1"], "--idle-timeout"),
        (vec!["--grace", "nan"], "--grace"),
        (vec!["--parallel", "0"], "--parallel"),
        (vec!["--api-key", " "], "--api-key"),
        (
            vec!["--chat-template", bad_template.to_str().ok_or("path")?],
            "--chat-template",
        ),
    ] {
        let mut all = vec!["serve", "--model-dir", tiny, "--port", "0"];
        all.extend_from_slice(&args);
        let out = common::gpt2(&all)?;
        common::assert_error(&out, 2, &[needle]);
    }
    Ok(())
}

/// Waits (up to [`common::HANG`]) until `f` holds.
fn wait_until(what: &str, mut f: impl FnMut() -> Result<bool>) -> Result {
    let deadline = Instant::now() + common::HANG;
    while !f()? {
        if Instant::now() > deadline {
            return Err(format!("never: {what}").into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

#[test]
fn a_full_queue_is_a_429_and_a_client_that_leaves_mid_stream_frees_its_slot() -> Result {
    use std::io::BufRead;
    // gpt2's layout: a step takes long enough that the stream is surely still running.
    let server = Server::start_layout("gpt2", &["--parallel", "1", "--max-queue", "1"])?;
    let r = ureq::post(&format!("{}/v1/completions", server.url))
        .set("Content-Type", "application/json")
        .send_string(
            &json!({"prompt": "a", "max_tokens": 1000, "ignore_eos": true, "stream": true})
                .to_string(),
        )?;
    let mut reader = std::io::BufReader::new(r.into_reader());
    let mut line = String::new();
    reader.read_line(&mut line)?;
    assert!(line.starts_with("data: "), "{line}");
    wait_until("the stream is running", || {
        Ok(server.metric("gpt2_active_sequences")? == 1.0)
    })?;
    // The next request waits for the slot; the one after finds the queue full.
    let waiting = completion_in_background(&server.url, 2);
    wait_until("a request is queued", || {
        Ok(server.metric("gpt2_queue_depth")? == 1.0)
    })?;
    let refused = ureq::post(&format!("{}/v1/completions", server.url))
        .set("Content-Type", "application/json")
        .send_string(&json!({"prompt": "b", "max_tokens": 2}).to_string());
    match refused {
        Err(ureq::Error::Status(429, r)) => {
            assert_eq!(r.header("retry-after"), Some("1"));
            let v: Value = serde_json::from_str(&r.into_string()?)?;
            assert_eq!(v["error"]["code"], "queue_full", "{v}");
        }
        other => return Err(format!("expected a 429, got {other:?}").into()),
    }
    // The streaming client leaves: its slot goes to the waiting request.
    drop(reader);
    let (s, body) = waiting.join().map_err(|_| "client panicked")??;
    assert_eq!(s, 200, "{body}");
    wait_until("the slot is freed", || {
        Ok(server.metric("gpt2_active_sequences")? == 0.0)
    })?;
    Ok(())
}

#[test]
fn a_stalled_client_does_not_block_others_and_is_cut_off() -> Result {
    let server = Server::start("tiny", &["--header-timeout", "1", "--timeout", "1"])?;
    let mut stalled = TcpStream::connect(&server.addr)?;
    stalled.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Le")?;
    // A body that never ends.
    let mut slow_body = TcpStream::connect(&server.addr)?;
    slow_body.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"pro")?;
    // Others are served meanwhile (a stream: the request timeout ends with its headers).
    let chunks = server.stream(
        "/v1/completions",
        &json!({"prompt": "a", "max_tokens": 3, "stream": true}),
    )?;
    assert_eq!(chunks.last(), Some(&json!("[DONE]")));
    let (s, _) = server.get("/health")?;
    assert_eq!(s, 200);
    // The half-sent headers are closed on at the header timeout, without a response.
    stalled.set_read_timeout(Some(common::HANG))?;
    let mut buf = Vec::new();
    stalled.read_to_end(&mut buf)?;
    assert!(
        !String::from_utf8_lossy(&buf).contains("HTTP/1.1 2"),
        "{buf:?}"
    );
    // The trickling body gets a 408 at the request timeout.
    slow_body.set_read_timeout(Some(common::HANG))?;
    let mut buf = Vec::new();
    let _ = slow_body.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("\"timeout_error\""), "{text}");
    Ok(())
}

/// A completion of `max_tokens` on `url`, on a thread: its status and body.
fn completion_in_background(
    url: &str,
    max_tokens: usize,
) -> std::thread::JoinHandle<std::result::Result<(u16, String), String>> {
    let url = format!("{url}/v1/completions");
    std::thread::spawn(move || {
        let r = ureq::post(&url)
            .set("Content-Type", "application/json")
            .send_string(
                &json!({"prompt": "a", "max_tokens": max_tokens, "ignore_eos": true}).to_string(),
            );
        match r {
            Ok(r) => Ok((r.status(), r.into_string().map_err(|e| e.to_string())?)),
            Err(ureq::Error::Status(code, r)) => {
                Ok((code, r.into_string().map_err(|e| e.to_string())?))
            }
            Err(e) => Err(e.to_string()),
        }
    })
}

#[test]
fn sigterm_lets_running_requests_finish_then_exits_0() -> Result {
    let mut server = Server::start_layout("gpt2", &["--grace", "600"])?;
    let running = completion_in_background(&server.url, 32);
    wait_until("the request runs", || {
        Ok(server.metric("gpt2_active_sequences")? == 1.0)
    })?;
    let status = server.terminate()?;
    assert_eq!(status.code(), Some(0), "{}", server.log());
    let (s, body) = running.join().map_err(|_| "client panicked")??;
    assert_eq!(s, 200, "{body}");
    let v: Value = serde_json::from_str(&body)?;
    assert_eq!(v["usage"]["completion_tokens"], 32);
    // Nothing listens any more.
    assert!(TcpStream::connect(&server.addr).is_err());
    Ok(())
}

#[test]
fn sigterm_cancels_what_outlasts_the_grace_then_exits_0() -> Result {
    let mut server = Server::start_layout("gpt2", &["--grace", "0.5"])?;
    let running = completion_in_background(&server.url, 1000);
    wait_until("the request runs", || {
        Ok(server.metric("gpt2_active_sequences")? == 1.0)
    })?;
    let status = server.terminate()?;
    assert_eq!(status.code(), Some(0), "{}", server.log());
    let (s, body) = running.join().map_err(|_| "client panicked")??;
    assert_eq!(s, 503, "{body}");
    assert!(body.contains("shutting down"), "{body}");
    Ok(())
}

#[test]
fn a_second_sigterm_exits_at_once_with_130() -> Result {
    let mut server = Server::start_layout("gpt2", &["--grace", "600"])?;
    let _running = completion_in_background(&server.url, 1000);
    wait_until("the request runs", || {
        Ok(server.metric("gpt2_active_sequences")? == 1.0)
    })?;
    server.signal_term()?;
    // The first stops the accepting; wait for that, then the second ends it all.
    wait_until("the listener closes", || {
        Ok(TcpStream::connect(&server.addr).is_err())
    })?;
    let status = server.terminate()?;
    assert_eq!(status.code(), Some(130), "{}", server.log());
    Ok(())
}

#[test]
fn a_stream_with_nothing_to_send_ends_at_the_idle_timeout() -> Result {
    let server = Server::start_layout("gpt2", &["--parallel", "1", "--idle-timeout", "1"])?;
    // The one slot is taken by a long request; the stream waits in the queue, token-less.
    let _long = completion_in_background(&server.url, 1000);
    wait_until("the long request runs", || {
        Ok(server.metric("gpt2_active_sequences")? == 1.0)
    })?;
    let chunks = server.stream(
        "/v1/completions",
        &json!({"prompt": "b", "max_tokens": 2, "stream": true}),
    )?;
    assert_eq!(chunks.len(), 1, "{chunks:?}");
    assert_eq!(chunks[0]["error"]["type"], "timeout_error", "{chunks:?}");
    // It left the queue.
    wait_until("the queue empties", || {
        Ok(server.metric("gpt2_queue_depth")? == 0.0)
    })?;
    Ok(())
}

#[test]
#[ignore = "needs chromium; CI runs it: cargo test -- --ignored"]
fn the_live_page_streams_tokens_and_attention_in_chromium() -> Result {
    let Some(browser) = common::chromium() else {
        common::skip(
            "the_live_page_streams_tokens_and_attention_in_chromium",
            "no chromium on PATH (Debian: apt-get install chromium)",
        );
        return Ok(());
    };
    let server = Server::start("induction", &[])?;
    let prompt = "abcdefabc";
    let (_, want) = server.post(
        "/v1/completions",
        &json!({"prompt": prompt, "max_tokens": 6, "temperature": 0}),
    )?;
    let profile = common::scratch("serve", "chromium-profile");
    let url = format!(
        "{}/?prompt={prompt}&max_tokens=6&temperature=0&layer=1&head=0&autorun=1",
        server.url
    );
    let (dom, log) = common::chromium_run(browser, &profile, &url, &["--dump-dom"])?;
    assert!(
        dom.contains("data-state=\"done\""),
        "the page never finished: {dom}\n{log}"
    );
    let status = dom
        .split("<pre id=\"status\">")
        .nth(1)
        .and_then(|s| s.split("</pre>").next())
        .ok_or("no status")?
        .replace("&quot;", "\"")
        .replace("&amp;", "&")
        .replace("&lt;", "<")
        .replace("&gt;", ">");
    let v: Value = serde_json::from_str(&status)?;
    assert_eq!(v["text"], want["choices"][0]["text"], "{v}");
    assert_eq!(v["generated"], 6);
    let (_, tok) = server.post("/tokenize", &json!({"content": prompt}))?;
    let n_prompt = tok["tokens"].as_array().map_or(0, Vec::len);
    for (i, k) in v["keys"].as_array().ok_or("keys")?.iter().enumerate() {
        assert_eq!(k.as_u64(), Some((n_prompt + i) as u64));
    }
    for sums in v["sums"].as_array().ok_or("sums")? {
        for s in sums.as_array().ok_or("sums")? {
            assert!((s.as_f64().unwrap_or(0.0) - 1.0).abs() < 1e-4, "{sums}");
        }
    }
    assert!(dom.contains("attends to"), "no attention view: {dom}");
    Ok(())
}

fn venv_python_with_openai() -> Option<String> {
    ["python3", "python"]
        .into_iter()
        .map(String::from)
        .find(|p| {
            std::process::Command::new(p)
                .args(["-c", "import openai"])
                .output()
                .is_ok_and(|o| o.status.success())
        })
}

#[test]
#[ignore = "needs python's openai package; CI runs it: cargo test -- --ignored"]
fn the_openai_python_client_works_against_it() -> Result {
    let Some(python) = venv_python_with_openai() else {
        common::skip(
            "the_openai_python_client_works_against_it",
            "python's openai package is not installed (pip install openai)",
        );
        return Ok(());
    };
    let server = Server::start("tiny", &["--api-key", "test-key"])?;
    let dir = common::fixture("tiny");
    let want = |args: &[&str]| -> Result<Vec<String>> {
        let mut all = vec!["--prompt", "The cat sat", "-n", "10"];
        all.extend_from_slice(args);
        generate("tiny", &all)
    };
    let greedy = want(&["--temperature", "0"])?;
    let seeded = want(&["--temperature", "0.9", "--seed", "3", "--num-samples", "2"])?;
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai_client.py");
    let mut cmd = std::process::Command::new(python);
    cmd.arg(script)
        .arg(format!("{}/v1", server.url))
        .arg("test-key")
        .env("NO_PROXY", "127.0.0.1,localhost");
    for var in common::PROXY_VARS {
        cmd.env_remove(var);
    }
    let out = common::output_within(&mut cmd, None)?;
    let stdout = String::from_utf8(out.stdout.clone())?;
    assert!(out.status.success(), "{}\n{}", stdout, common::stderr(&out));
    let v: Value = serde_json::from_str(stdout.trim()).map_err(|e| format!("{e}: {stdout}"))?;
    assert_eq!(v["greedy"], json!(greedy));
    assert_eq!(v["streamed"], json!(greedy));
    assert_eq!(v["seeded"], json!(seeded));
    assert_eq!(v["logprobs_tokens"], 10);
    assert_eq!(v["unauthorized"], 401);
    let _ = dir;
    Ok(())
}
