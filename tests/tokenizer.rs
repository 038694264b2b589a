//! The tokenizer against the real GPT-2 vocabulary and against tiktoken's `r50k_base` (the
//! encoding GPT-2 uses), through every way of loading it, plus streaming decode and the small
//! committed fixtures.
//!
//! GPT-2's `vocab.json` and `merges.txt` are not committed here: they ship inside the tiktoken-rs
//! crate source (`assets/encoder.json` and `assets/vocab.bpe`), which `cargo test` puts on disk;
//! [`gpt2_assets`] finds them with `cargo metadata` (this platform's packages only).

use std::error::Error;
use std::path::{Path, PathBuf};
use std::process::Command;

use gpt2::Tokenizer;

mod common;

const EOT: &str = "<|endoftext|>";
const EOT_ID: u32 = 50256;

// ---------------------------------------------------------------------------------------------
// Locating GPT-2's files and building tokenizers

/// The `assets` directory of the tiktoken-rs crate source, which holds GPT-2's `encoder.json`
/// (the Hub's `vocab.json`) and `vocab.bpe` (the Hub's `merges.txt`).
fn tiktoken_assets() -> Result<PathBuf, Box<dyn Error>> {
    let cargo = std::env::var_os("CARGO")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO")));
    let manifest_dir = env!("CARGO_MANIFEST_DIR");
    // Only this platform's packages: `cargo metadata` otherwise resolves every platform's, and
    // a Windows-only crate is never downloaded on Linux, so `--offline` fails on a machine
    // whose registry holds just what `cargo test` fetched.
    let host = host_triple()?;
    let args = [
        "metadata",
        "--format-version",
        "1",
        "--offline",
        "--filter-platform",
        &host,
    ];
    let output = Command::new(&cargo)
        .args(args)
        .current_dir(manifest_dir)
        .output()
        .map_err(|e| format!("could not run `{} metadata`: {e}", cargo.display()))?;
    if !output.status.success() {
        return Err(format!(
            "`{} {}` in {manifest_dir} failed ({}):\n{}",
            cargo.display(),
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        )
        .into());
    }
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout)
        .map_err(|e| format!("`cargo metadata` printed something that is not JSON: {e}"))?;
    let packages = metadata["packages"]
        .as_array()
        .ok_or("`cargo metadata` output has no `packages` array")?;
    let package = packages
        .iter()
        .find(|p| p["name"] == "tiktoken-rs")
        .ok_or("`cargo metadata` lists no package named `tiktoken-rs` (a dev-dependency)")?;
    let manifest_path = package["manifest_path"]
        .as_str()
        .ok_or("the `tiktoken-rs` package in `cargo metadata` has no `manifest_path`")?;
    let assets = Path::new(manifest_path)
        .parent()
        .ok_or_else(|| format!("tiktoken-rs manifest path {manifest_path} has no parent"))?
        .join("assets");
    for file in ["encoder.json", "vocab.bpe"] {
        let path = assets.join(file);
        if !path.is_file() {
            return Err(format!(
                "{} does not exist: tiktoken-rs {} source no longer ships GPT-2's files there",
                path.display(),
                package["version"]
            )
            .into());
        }
    }
    Ok(assets)
}

/// The target triple `rustc` builds for by default (`host:` in `rustc -vV`), which is what
/// `cargo test` built these tests for.
fn host_triple() -> Result<String, Box<dyn Error>> {
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let out = Command::new(&rustc)
        .arg("-vV")
        .output()
        .map_err(|e| format!("could not run `{} -vV`: {e}", rustc.to_string_lossy()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let host = text
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .ok_or_else(|| format!("`rustc -vV` printed no `host:` line:\n{text}"))?;
    Ok(host.trim().to_string())
}

/// GPT-2's `(vocab.json, merges.txt)`.
fn gpt2_assets() -> Result<(PathBuf, PathBuf), Box<dyn Error>> {
    let assets = tiktoken_assets()?;
    Ok((assets.join("encoder.json"), assets.join("vocab.bpe")))
}

/// The real GPT-2 tokenizer, built from `vocab.json` + `merges.txt`.
fn gpt2_tokenizer() -> Result<Tokenizer, Box<dyn Error>> {
    let (vocab, merges) = gpt2_assets()?;
    Ok(Tokenizer::from_vocab_merges(vocab, merges)?)
}

// ---------------------------------------------------------------------------------------------
// The test corpus

/// Strings chosen to hit the corners of GPT-2's pre-tokenizer regex and byte-level BPE.
/// None contains `<|endoftext|>`, so ordinary and special-aware encoders agree on all of them.
const HARD_CASES: &[&str] = &[
    "",
    " ",
    "\n",
    "        ",
    "Hello, world!",
    "naïve café résumé à la carte — Ünïcödé",
    "Crème brûlée, jalapeño, Straße, façade, smørrebrød, Ångström",
    "cafe\u{301} and e\u{301}le\u{300}ve (combining accents)",
    "🦀 Rust 🦀",
    "👨‍👩‍👧‍👦 family, 👩🏽‍💻 coder, 🏳️‍🌈 flag",
    "🇯🇵🇫🇷🇺🇸🇩🇪 flags",
    "👍🏿👍🏻✨🔥💯",
    "emoji at the very end 🎉",
    "日本語のテキスト、漢字とカタカナ。",
    "中文文本：你好，世界！",
    "한국어 텍스트입니다",
    "العربية: مرحبا بالعالم",
    "עברית: שלום עולם",
    "हिन्दी: नमस्ते दुनिया",
    "Ελληνικά και русский текст",
    "multiple   spaces    between     words",
    "\ttab\tseparated\t\tvalues\t",
    "line one\nline two\n\n\nline five",
    "trailing spaces   ",
    "   leading spaces",
    "windows\r\nline\r\nendings\r\n",
    " \n \t \r\n  mixed\u{a0}whitespace \u{a0} ",
    "it's they're we've I'm you'll he'd don't",
    "IT'S THEY'RE WE'VE I'M YOU'LL HE'D DON'T",
    "'s's 't'll' 'quoted' \"double\" ‘curly’ “quotes” l'homme",
    "fn main() {\n    let x: Vec<u32> = (0..10).map(|i| i * 2).collect();\n    println!(\"{:?}\", x);\n}\n",
    "def f(x):\n    if x > 0:\n        return x ** 2\n    else:\n\t\treturn -x  # comment\n",
    "1234567 3.14159 -0.5e10 1,000,000 0x1F 007",
    "In 1969, 2 astronauts; 12:30pm on 2024-01-31.",
    "!!!??? ... --- *** ((())) [[{}]] ;;;::: ,,,",
    "https://example.com/path?query=1&x=y#frag and http://www.test.org/a_b-c",
    "user@example.com, @mention #hashtag $100 50% ^caret ~tilde `code`",
    "a literal \u{FFFD} replacement character",
    "zero\u{200b}width\u{200d}joiner\u{feff}bom",
    "\u{3000}ideographic space and\u{2003}em space",
    "a\u{0}b\u{1}c\u{7f}d",
    "\u{85}next line, \u{b}vertical tab, \u{c}form feed",
    "\u{1c}\u{1d}\u{1e}\u{1f} information separators",
    "Mathematical 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and ∑∫√∞ ≠ ≤",
    "½ ² ³ ٣ ๓ Ⅻ ①",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "Supercalifragilisticexpialidocious antidisestablishmentarianism",
];

/// Pieces the generated strings are built from.
const FRAGMENTS: &[&str] = &[
    "the",
    "The",
    "THE",
    "hello",
    "world",
    "GPT",
    "token",
    "izer",
    "naïve",
    "café",
    "über",
    "Straße",
    "日本",
    "語",
    "テキスト",
    "中文",
    "한국",
    "مرحبا",
    "שלום",
    "नमस्ते",
    "Ελλάδα",
    "привет",
    "🦀",
    "😀",
    "👍🏽",
    "👨‍👩‍👧",
    "🇯🇵",
    "🏳️‍🌈",
    "\u{200d}",
    "\u{301}",
    "'s",
    "'S",
    "'t",
    "'re",
    "'ve",
    "'m",
    "'ll",
    "'d",
    "'",
    "\"",
    "don't",
    "I'm",
    " ",
    " ",
    " ",
    "  ",
    "   ",
    "\t",
    "\n",
    "\n\n",
    "\r\n",
    " \n",
    "\u{a0}",
    "\u{3000}",
    "0",
    "7",
    "42",
    "1234567",
    "3.14159",
    "-0.5e10",
    "1,000",
    ".",
    ",",
    "!",
    "?",
    "...",
    "--",
    "(",
    ")",
    "{",
    "}",
    "[",
    "]",
    "<",
    ">",
    "/",
    "\\",
    "::",
    "->",
    "=>",
    "#",
    "@",
    "$",
    "%",
    "&",
    "*",
    "_",
    "+",
    "=",
    "|",
    "~",
    "`",
    "fn",
    "def",
    "let",
    "x",
    "    ",
    "        ",
    "return",
    "http://",
    ".com",
];

/// A tiny deterministic PRNG (SplitMix64).
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

const GENERATED: usize = 300;

/// [`HARD_CASES`] followed by [`GENERATED`] strings of 1 to 12 random fragments.
fn corpus() -> Vec<String> {
    let mut rng = SplitMix64(0x5EED_1234);
    let mut strings: Vec<String> = HARD_CASES.iter().map(|s| s.to_string()).collect();
    for _ in 0..GENERATED {
        let n = 1 + rng.below(12);
        let s: String = (0..n)
            .map(|_| FRAGMENTS[rng.below(FRAGMENTS.len())])
            .collect();
        strings.push(s);
    }
    strings
}

/// Runs `check` on every string; reports all failures (escaped), then fails if there were any.
fn check_all(
    what: &str,
    strings: &[String],
    mut check: impl FnMut(&str) -> Result<Option<String>, Box<dyn Error>>,
) -> common::Result {
    let mut failures = Vec::new();
    for s in strings {
        if let Some(why) = check(s)? {
            failures.push(format!("{s:?}: {why}"));
        }
    }
    for f in failures.iter().take(30) {
        eprintln!("{what} mismatch: {f}");
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{what}: {} of {} strings failed (first ones printed above)",
            failures.len(),
            strings.len()
        )
        .into())
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Known ids

#[test]
fn hello_world_ids() -> common::Result {
    let tok = gpt2_tokenizer()?;
    assert_eq!(tok.encode("Hello, world!")?, [15496, 11, 995, 0]);
    assert_eq!(tok.decode(&[15496, 11, 995, 0])?, "Hello, world!");
    assert_eq!(tok.vocab_size(), 50257);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 2. Agreement with tiktoken's r50k_base, and round trips

#[test]
fn corpus_has_expected_size() {
    let strings = corpus();
    assert_eq!(strings.len(), HARD_CASES.len() + GENERATED);
    // Deterministic: two builds give the same strings.
    assert_eq!(strings, corpus());
}

#[test]
fn agrees_with_tiktoken_r50k_base() -> common::Result {
    let tok = gpt2_tokenizer()?;
    let reference = tiktoken_rs::r50k_base()?;
    check_all("tiktoken r50k_base", &corpus(), |s| {
        let ours = tok.encode(s)?;
        let theirs = reference.encode_ordinary(s);
        Ok((ours != theirs).then(|| format!("\n  ours:     {ours:?}\n  tiktoken: {theirs:?}")))
    })
}

#[test]
fn decode_inverts_encode() -> common::Result {
    let tok = gpt2_tokenizer()?;
    check_all("round trip", &corpus(), |s| {
        let ids = tok.encode(s)?;
        let back = tok.decode(&ids)?;
        Ok((back != s).then(|| format!("decoded to {back:?} (ids {ids:?})")))
    })
}

// ---------------------------------------------------------------------------------------------
// 3. tokenizer.json and from_dir give the same tokenizer

#[test]
fn saved_tokenizer_json_encodes_the_same() -> common::Result {
    let tok = gpt2_tokenizer()?;
    let dir = common::scratch("tokenizer", "saved");
    let json = dir.join("tokenizer.json");
    tok.save(&json)?;
    assert!(json.is_file(), "save() wrote no {}", json.display());

    let from_file = Tokenizer::from_file(&json)?;
    let from_dir = Tokenizer::from_dir(&dir)?;
    for (name, other) in [("from_file", &from_file), ("from_dir", &from_dir)] {
        assert_eq!(other.vocab_size(), tok.vocab_size(), "{name}: vocab size");
        assert_eq!(other.token_to_id(EOT), Some(EOT_ID), "{name}: {EOT}");
        check_all(name, &corpus(), |s| {
            let (a, b) = (tok.encode(s)?, other.encode(s)?);
            if a != b {
                return Ok(Some(format!(
                    "\n  vocab+merges:   {a:?}\n  tokenizer.json: {b:?}"
                )));
            }
            let back = other.decode(&b)?;
            Ok((back != s).then(|| format!("decoded to {back:?}")))
        })?;
    }
    Ok(())
}

#[test]
fn from_dir_with_vocab_and_merges() -> common::Result {
    let (vocab, merges) = gpt2_assets()?;
    let dir = common::scratch("tokenizer", "vocab-merges");
    std::fs::copy(&vocab, dir.join("vocab.json"))?;
    std::fs::copy(&merges, dir.join("merges.txt"))?;

    let tok = gpt2_tokenizer()?;
    let from_dir = Tokenizer::from_dir(&dir)?;
    assert_eq!(from_dir.encode("Hello, world!")?, [15496, 11, 995, 0]);
    assert_eq!(from_dir.vocab_size(), 50257);
    check_all("from_dir(vocab.json + merges.txt)", &corpus(), |s| {
        let (a, b) = (tok.encode(s)?, from_dir.encode(s)?);
        Ok((a != b).then(|| format!("\n  from_vocab_merges: {a:?}\n  from_dir:          {b:?}")))
    })
}

#[test]
fn from_dir_on_empty_dir_is_an_error() -> common::Result {
    let dir = common::scratch("tokenizer", "empty");
    match Tokenizer::from_dir(&dir) {
        Ok(_) => Err(format!("from_dir({}) succeeded on an empty dir", dir.display()).into()),
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains("tokenizer.json"),
                "error does not mention tokenizer.json: {msg}"
            );
            Ok(())
        }
    }
}

#[test]
fn from_dir_with_only_vocab_is_an_error() -> common::Result {
    let (vocab, _) = gpt2_assets()?;
    let dir = common::scratch("tokenizer", "vocab-only");
    std::fs::copy(&vocab, dir.join("vocab.json"))?;
    let err = match Tokenizer::from_dir(&dir) {
        Ok(_) => return Err("from_dir succeeded with vocab.json but no merges.txt".into()),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("merges.txt"),
        "error does not mention merges.txt: {err}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 4. <|endoftext|>

#[test]
fn end_of_text_is_special() -> common::Result {
    let tok = gpt2_tokenizer()?;
    assert_eq!(tok.token_to_id(EOT), Some(EOT_ID));
    assert_eq!(gpt2::tokenizer::END_OF_TEXT, EOT);

    let text = "a<|endoftext|>b";
    let ids = tok.encode(text)?;
    assert_eq!(ids, [64, EOT_ID, 65], "{text:?}");
    assert_eq!(tok.decode(&ids)?, text);
    // tiktoken, when allowed to see special tokens, agrees.
    let reference = tiktoken_rs::r50k_base()?;
    assert_eq!(reference.encode_with_special_tokens(text), ids);

    let text = "<|endoftext|>The end.<|endoftext|>";
    let ids = tok.encode(text)?;
    assert_eq!(ids.first(), Some(&EOT_ID), "{ids:?}");
    assert_eq!(ids.last(), Some(&EOT_ID), "{ids:?}");
    assert_eq!(ids, reference.encode_with_special_tokens(text));
    assert_eq!(tok.decode(&ids)?, text);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 5. Streaming decode

/// Pushes `ids` one at a time; returns the chunks `push` returned and what `finish` returned.
fn stream_all(
    tok: &Tokenizer,
    ids: &[u32],
) -> Result<(Vec<String>, Option<String>), Box<dyn Error>> {
    let mut stream = tok.stream();
    let mut chunks = Vec::new();
    for &id in ids {
        if let Some(chunk) = stream.push(id)? {
            chunks.push(chunk);
        }
    }
    Ok((chunks, stream.finish()?))
}

const MULTI_TOKEN_CHARS: &[&str] = &[
    "🦀 Rust 🦀",
    "日本語のテキスト",
    "👨‍👩‍👧‍👦 family",
    "naïve café",
    "🇯🇵🇫🇷 flags and 👍🏽",
    "한국어 텍스트",
    "नमस्ते",
    "end with emoji 🎉",
];

#[test]
fn stream_holds_back_partial_characters() -> common::Result {
    let tok = gpt2_tokenizer()?;
    let mut tokens_alone_broken = 0;
    for &s in MULTI_TOKEN_CHARS {
        let ids = tok.encode(s)?;
        for &id in &ids {
            if tok.decode(&[id])?.contains('\u{FFFD}') {
                tokens_alone_broken += 1;
            }
        }
        let (chunks, rest) = stream_all(&tok, &ids)?;
        for chunk in &chunks {
            assert!(
                !chunk.contains('\u{FFFD}'),
                "{s:?}: stream returned a broken chunk {chunk:?} (all chunks {chunks:?}, ids {ids:?})"
            );
        }
        assert_eq!(
            rest, None,
            "{s:?}: finish() held back text though the last character was whole"
        );
        let joined: String = chunks.concat();
        assert_eq!(joined, s, "{s:?}: chunks {chunks:?}, ids {ids:?}");
    }
    // Otherwise the test above would pass with a naive per-token decode.
    assert!(
        tokens_alone_broken > 0,
        "no token of {MULTI_TOKEN_CHARS:?} decodes to U+FFFD on its own: the test proves nothing"
    );
    Ok(())
}

#[test]
fn stream_reassembles_the_whole_corpus() -> common::Result {
    let tok = gpt2_tokenizer()?;
    check_all("stream", &corpus(), |s| {
        let ids = tok.encode(s)?;
        let (chunks, rest) = stream_all(&tok, &ids)?;
        if !s.contains('\u{FFFD}') {
            if let Some(bad) = chunks.iter().find(|c| c.contains('\u{FFFD}')) {
                return Ok(Some(format!("broken chunk {bad:?} in {chunks:?}")));
            }
        }
        let mut joined = chunks.concat();
        joined.push_str(rest.as_deref().unwrap_or(""));
        Ok((joined != s).then(|| format!("reassembled {joined:?} from {chunks:?} + {rest:?}")))
    })
}

#[test]
fn stream_returns_a_broken_tail_only_from_finish() -> common::Result {
    let tok = gpt2_tokenizer()?;

    // Only the first token of an emoji: nothing complete to print until finish().
    let crab = tok.encode("🦀")?;
    assert!(
        crab.len() > 1,
        "🦀 is a single token {crab:?}: pick another emoji"
    );
    let first = &crab[..1];
    let alone = tok.decode(first)?;
    assert!(
        alone.contains('\u{FFFD}'),
        "first token of 🦀 decodes to {alone:?}"
    );
    let (chunks, rest) = stream_all(&tok, first)?;
    assert!(
        chunks.is_empty(),
        "push returned {chunks:?} for a partial character"
    );
    assert_eq!(rest.as_deref(), Some(alone.as_str()));

    // Whole text, then a partial character: the text comes out of push, the tail out of finish.
    let ids = tok.encode("Hi there 🦀")?;
    let cut = &ids[..ids.len() - 1];
    let (chunks, rest) = stream_all(&tok, cut)?;
    assert_eq!(chunks.concat(), "Hi there", "chunks {chunks:?}");
    let rest = rest.ok_or("finish() returned nothing for a held-back partial character")?;
    assert!(rest.contains('\u{FFFD}'), "finish() returned {rest:?}");
    assert_eq!(format!("{}{rest}", chunks.concat()), tok.decode(cut)?);

    // finish() hands the held-back tail out once.
    let mut stream = tok.stream();
    assert_eq!(stream.push(first[0])?, None);
    assert_eq!(stream.finish()?.as_deref(), Some(alone.as_str()));
    assert_eq!(stream.finish()?, None, "finish() returned the tail twice");

    // An empty stream finishes with nothing.
    let (chunks, rest) = stream_all(&tok, &[])?;
    assert!(chunks.is_empty());
    assert_eq!(rest, None);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 6. The committed tiny fixtures

const PROMPT: &str = "The cat sat on the mat because";

fn golden_prompt_ids(dir: &Path) -> Result<Vec<u32>, Box<dyn Error>> {
    let path = dir.join("goldens.json");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let goldens: serde_json::Value = serde_json::from_str(&text)?;
    assert_eq!(goldens["prompt_text"], PROMPT, "{}", path.display());
    let ids = goldens["greedy_prompt_ids"]
        .as_array()
        .ok_or_else(|| format!("{}: no greedy_prompt_ids array", path.display()))?;
    ids.iter()
        .map(|v| {
            v.as_u64()
                .map(|x| x as u32)
                .ok_or_else(|| format!("{}: greedy_prompt_ids holds {v}", path.display()).into())
        })
        .collect()
}

/// `goldens.safetensors`' `input_ids` (rows of transformers' tokenization of `input_texts`).
/// Texts and the id rows transformers made of them.
type TextsAndIds = (Vec<String>, Vec<Vec<u32>>);

fn golden_input_ids(dir: &Path) -> Result<TextsAndIds, Box<dyn Error>> {
    let goldens: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("goldens.json"))?)?;
    let texts: Vec<String> = goldens["input_texts"]
        .as_array()
        .ok_or("goldens.json: no input_texts")?
        .iter()
        .map(|t| {
            t.as_str()
                .map(String::from)
                .ok_or("input_texts: not a string")
        })
        .collect::<Result<_, _>>()?;
    let bytes = std::fs::read(dir.join("goldens.safetensors"))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)?;
    let view = st.tensor("input_ids")?;
    assert_eq!(view.dtype(), safetensors::Dtype::I64, "input_ids dtype");
    let shape = view.shape();
    assert_eq!(shape.len(), 2, "input_ids shape {shape:?}");
    let flat: Vec<u32> = view
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32)
        .collect();
    Ok((texts, flat.chunks(shape[1]).map(<[u32]>::to_vec).collect()))
}

#[test]
fn tiny_fixtures_match_goldens_and_each_other() -> common::Result {
    let (dir_a, dir_b) = (common::fixture("tiny"), common::fixture("tiny-b"));
    assert!(dir_a.join("tokenizer.json").is_file());
    assert!(
        !dir_b.join("tokenizer.json").exists(),
        "tiny-b is meant to test vocab.json + merges.txt"
    );
    let a = Tokenizer::from_dir(&dir_a)?;
    let b = Tokenizer::from_dir(&dir_b)?;

    for (dir, tok) in [(&dir_a, &a), (&dir_b, &b)] {
        let want = golden_prompt_ids(dir)?;
        assert_eq!(tok.encode(PROMPT)?, want, "{}", dir.display());
        assert_eq!(tok.decode(&want)?, PROMPT, "{}", dir.display());
        assert_eq!(tok.vocab_size(), 512, "{}", dir.display());
        assert_eq!(tok.token_to_id(EOT), Some(511), "{}", dir.display());

        let (texts, rows) = golden_input_ids(dir)?;
        assert_eq!(texts.len(), rows.len());
        for (text, row) in texts.iter().zip(&rows) {
            assert_eq!(&tok.encode(text)?, row, "{}: {text:?}", dir.display());
        }
    }

    // The truncated vocabulary still covers every byte, so it round-trips anything, and the two
    // loading paths agree.
    check_all("tiny vs tiny-b", &corpus(), |s| {
        let (ia, ib) = (a.encode(s)?, b.encode(s)?);
        if ia != ib {
            return Ok(Some(format!("\n  tiny:   {ia:?}\n  tiny-b: {ib:?}")));
        }
        let back = a.decode(&ia)?;
        Ok((back != s).then(|| format!("tiny decoded to {back:?}")))
    })
}
