//! GPT-2's byte-level BPE, via the `tokenizers` crate: `tokenizer.json` when a model has one, else
//! `vocab.json` + `merges.txt` assembled into the same pipeline transformers' `GPT2TokenizerFast`
//! builds. Decoding for streaming holds back bytes until they form whole UTF-8 characters.

use std::path::{Path, PathBuf};

use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::models::bpe::BPE;
use tokenizers::{AddedToken, DecodeStream};

use crate::error::{catch_panic, human_bytes, Error, Result};

/// GPT-2's end-of-text token, which also starts documents.
pub const END_OF_TEXT: &str = "<|endoftext|>";

/// Memory `tokenizers` takes per byte of text while encoding it, at most: the text's copies and
/// byte-to-byte alignments (normalised and pre-tokenised), BPE's symbols, and the encoding's
/// per-token ids, offsets and strings, on text of one token per byte, vectors' growth included
/// (measured in docs/PERF.md's log); a little more, to be sure of the refusal.
const ENCODE_BYTES_PER_BYTE: usize = 320;

/// Where a model's tokenizer lives: `tokenizer.json` when it has one (preferred, as transformers
/// does), else the `vocab.json` + `merges.txt` pair.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenizerFiles {
    Json(PathBuf),
    VocabMerges { vocab: PathBuf, merges: PathBuf },
}

impl TokenizerFiles {
    /// The tokenizer files of a local folder.
    pub fn find_in(dir: &Path) -> Result<Self> {
        let json = dir.join("tokenizer.json");
        if json.is_file() {
            return Ok(Self::Json(json));
        }
        let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
        if vocab.is_file() && merges.is_file() {
            return Ok(Self::VocabMerges { vocab, merges });
        }
        Err(Error::Tokenizer(format!(
            "{}: no tokenizer.json, nor vocab.json + merges.txt",
            dir.display()
        )))
    }
}

/// A GPT-2 tokenizer.
///
/// A tokenizer file is checked when it loads: a vocabulary, and text (every byte UTF-8 can
/// hold) encoded to at least one token; [`Tokenizer::check_vocab_size`] checks its ids against
/// a model's embedding. Encoding and decoding never panic: a panic inside the `tokenizers` crate
/// (it indexes past the text on an empty `Replace` pattern, Oniguruma gives up a regex that
/// backtracks too much) is an error naming the file. Not checked: a tokenizer that drops part
/// of a text without an error.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Where it comes from, for messages: the `tokenizer.json`, `vocab.json + merges.txt`, or
    /// GPT-2's byte tokens.
    origin: String,
}

/// Oniguruma's limit on the backtracking steps of one regex search, every start position
/// together: about a second. Its default is none, and a regex that backtracks heavily at every
/// position of a long text (but under the 10^7 steps a match at one position may take) ran for
/// minutes; past the limit the search fails (a panic in the `onig` crate, caught). Ordinary
/// pre-tokenizer regexes take a few steps per character.
///
/// Not bounded: a regex that matches often, each search just under the limit, still takes time
/// in proportion to the text (a second per match found); the second Ctrl-C stops it.
const REGEX_SEARCH_STEPS: std::os::raw::c_ulong = 100_000_000;

/// Sets [`REGEX_SEARCH_STEPS`] once, before any tokenizer of ours searches (each is parsed in
/// [`Tokenizer::from_file`] or built through [`Tokenizer::checked`], which call this first).
fn limit_regex_search() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    // SAFETY: writes one of Oniguruma's globals, read when a search starts; the `Once` orders it
    // before every search of ours (every path to one calls this first, and `call_once` makes
    // other threads wait until it has run).
    ONCE.call_once(|| unsafe {
        onig_sys::onig_set_retry_limit_in_search(REGEX_SEARCH_STEPS);
    });
}

/// Text with every byte UTF-8 can hold (all but 0xC0, 0xC1 and 0xF5..=0xFF): U+0000..U+00FF
/// (bytes 0x00..0x7F, and 0xC2, 0xC3 before each of 0x80..0xBF), one character for each other
/// lead byte, and ordinary words.
fn probe() -> String {
    let two = (0xC4u32..=0xDF).map(|lead| (lead - 0xC0) << 6);
    let three = std::iter::once(0x800).chain((1u32..16).map(|i| i << 12));
    let four = [0x10000, 0x40000, 0x80000, 0xC0000, 0x100000];
    let mut text: String = (0u32..0x100)
        .chain(two)
        .chain(three)
        .chain(four)
        .filter_map(char::from_u32)
        .collect();
    text.push_str(" Hello, world! It's 42.\n\t  The end.");
    text
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json`, or `dir/vocab.json` + `dir/merges.txt` when there is none.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        Self::from_files(&TokenizerFiles::find_in(dir.as_ref())?)
    }

    /// Loads the files [`TokenizerFiles`] names.
    pub fn from_files(files: &TokenizerFiles) -> Result<Self> {
        match files {
            TokenizerFiles::Json(path) => Self::from_file(path),
            TokenizerFiles::VocabMerges { vocab, merges } => Self::from_vocab_merges(vocab, merges),
        }
    }

    /// Loads a `tokenizer.json`. Parsing already runs its normalizer over added tokens, so the
    /// regex limit is set first and a panic of the crate is an error naming the file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        limit_regex_search();
        let inner = catch_panic(|| tokenizers::Tokenizer::from_file(path))
            .map_err(|p| Error::Tokenizer(format!("{}: cannot be read ({p})", path.display())))?
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        Self::checked(inner, path.display().to_string())
    }

    /// `inner`, checked to tokenise: a vocabulary, short texts encoded (no error, no panic), and
    /// the [`probe`] text to at least one token.
    fn checked(inner: tokenizers::Tokenizer, origin: String) -> Result<Self> {
        limit_regex_search();
        let t = Self { inner, origin };
        if t.inner.get_vocab_size(true) == 0 {
            return Err(t.error("the vocabulary is empty"));
        }
        // Short texts too: the crate's faults depend on the text (an empty `Replace` pattern
        // indexes past "a" but not past " a").
        for text in ["a", "Hello, world!", "\n", "日本🦀"] {
            t.encode(text)?;
        }
        if t.encode(&probe())?.is_empty() {
            return Err(t.error(
                "encodes text to no tokens: its vocabulary has neither byte tokens nor an unknown \
                 token",
            ));
        }
        Ok(t)
    }

    /// Checks every id the tokenizer can give (its vocabulary and added tokens) against a
    /// model's embedding of `vocab_size` rows: an id past it would fail every run it appears in.
    pub fn check_vocab_size(&self, vocab_size: usize) -> Result<()> {
        let vocab = self.inner.get_vocab(true);
        match vocab.iter().max_by_key(|(_, &id)| id) {
            Some((token, &id)) if id as usize >= vocab_size => Err(self.error(format!(
                "token `{token}` has id {id}, outside the model's embedding of {vocab_size} \
                 tokens (config.json's vocab_size {vocab_size})"
            ))),
            _ => Ok(()),
        }
    }

    /// An error about this tokenizer, naming its file.
    fn error(&self, msg: impl std::fmt::Display) -> Error {
        Error::Tokenizer(format!("{}: {msg}", self.origin))
    }

    /// The error for a panic inside the `tokenizers` crate while it encoded or decoded.
    fn panicked(&self, what: &str, msg: &str) -> Error {
        if msg.contains("retry-limit") {
            self.error(format!(
                "cannot {what}: a regex of its normalizer or pre-tokenizer backtracks too much \
                 ({msg})"
            ))
        } else {
            self.error(format!(
                "cannot {what}: the tokenizers crate failed ({msg})"
            ))
        }
    }

    /// Builds GPT-2's byte-level BPE from `vocab.json` and `merges.txt`.
    pub fn from_vocab_merges(vocab: impl AsRef<Path>, merges: impl AsRef<Path>) -> Result<Self> {
        let (vocab, merges) = (vocab.as_ref(), merges.as_ref());
        let path_str = |p: &Path| {
            p.to_str()
                .map(String::from)
                .ok_or_else(|| Error::Tokenizer(format!("{}: path is not UTF-8", p.display())))
        };
        let origin = format!("{} + {}", vocab.display(), merges.display());
        let (vocab, merges) = (path_str(vocab)?, path_str(merges)?);
        let bpe = catch_panic(|| BPE::from_file(&vocab, &merges).build())
            .map_err(|p| Error::Tokenizer(format!("{origin}: cannot be read ({p})")))?
            .map_err(|e| Error::Tokenizer(format!("{origin}: {e}")))?;
        Self::byte_level(bpe, origin)
    }

    /// The pipeline transformers' `GPT2TokenizerFast` builds around a byte-level BPE model.
    fn byte_level(bpe: BPE, origin: String) -> Result<Self> {
        let mut inner = tokenizers::Tokenizer::new(bpe);
        // GPT-2: split with its regex, no prefix space; decode bytes back; keep offsets as they are.
        inner
            .with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)))
            .with_decoder(Some(ByteLevel::default()))
            .with_post_processor(Some(ByteLevel::default().trim_offsets(false)));
        inner.add_special_tokens(&[AddedToken::from(END_OF_TEXT, true)]);
        Self::checked(inner, origin)
    }

    /// GPT-2's 256 byte tokens and no merges: every byte of the text is one token, with the ids
    /// GPT-2 gives single bytes, plus `<|endoftext|>` at `eos_id`. For random-weight models
    /// (`--config`), which have no tokenizer files.
    pub fn bytes_only(eos_id: u32) -> Result<Self> {
        Self::bytes_and(eos_id, false)
    }

    /// [`Tokenizer::bytes_only`] with the ids between the bytes and `<|endoftext|>` named
    /// `<|unused{id}|>` (never produced: there are no merges), so that its `tokenizer.json` has
    /// no holes: what `gpt2 train` saves beside a model trained from a layout.
    pub fn bytes_only_dense(eos_id: u32) -> Result<Self> {
        Self::bytes_and(eos_id, true)
    }

    fn bytes_and(eos_id: u32, dense: bool) -> Result<Self> {
        let mut vocab: tokenizers::models::bpe::Vocab = gpt2_byte_chars()
            .into_iter()
            .enumerate()
            .map(|(id, c)| (c.to_string(), id as u32))
            .collect();
        vocab.insert(END_OF_TEXT.to_string(), eos_id.max(256));
        let unused = if dense { 256..eos_id } else { 0..0 };
        vocab.extend(unused.clone().map(|id| (format!("<|unused{id}|>"), id)));
        if vocab.len() != 257 + unused.len() {
            return Err(Error::Tokenizer(format!(
                "eos id {eos_id} collides with a byte token"
            )));
        }
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, Vec::new())
            .build()
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Self::byte_level(bpe, "GPT-2's byte tokens".into())
    }

    /// Token ids of `text`, with nothing added around it (GPT-2 adds no BOS). A text too long to
    /// tokenise in the memory available is refused first, with what it would need.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let needed = crate::memory::product(&[text.len(), ENCODE_BYTES_PER_BYTE]);
        // Short texts (every prompt but a file's) skip reading /proc.
        if needed > 1 << 26 {
            if let Err(Error::OutOfMemory { available, .. }) =
                crate::memory::check(needed, String::new)
            {
                return Err(Error::Tokenizer(format!(
                    "a text of {} bytes ({}) needs about {needed} bytes ({}) to tokenise, more than \
                     the {} of memory available: split it into pieces under {}",
                    text.len(),
                    human_bytes(text.len() as u128),
                    human_bytes(needed),
                    human_bytes(available),
                    human_bytes(available / ENCODE_BYTES_PER_BYTE as u128),
                )));
            }
        }
        let encoding = catch_panic(|| self.inner.encode(text, false))
            .map_err(|msg| self.panicked("encode text", &msg))?
            .map_err(|e| self.error(format!("cannot encode text: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The text of `ids`; bytes that do not form UTF-8 become U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        catch_panic(|| self.inner.decode(ids, false))
            .map_err(|msg| self.panicked("decode tokens", &msg))?
            .map_err(|e| self.error(format!("cannot decode tokens: {e}")))
    }

    /// The id of a token string such as `<|endoftext|>`.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Writes the tokenizer as a `tokenizer.json`.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        self.inner
            .save(path, false)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))
    }

    /// A decoder for ids arriving one at a time; see [`TextStream`].
    pub fn stream(&self) -> TextStream<'_> {
        TextStream {
            tokenizer: self,
            inner: self.inner.decode_stream(false),
            pending: Vec::new(),
        }
    }
}

/// GPT-2's printable stand-in for each byte, in id order: byte tokens 0..256 of `vocab.json`.
/// From `bytes_to_unicode` in <https://github.com/openai/gpt-2/blob/master/src/encoder.py>.
fn gpt2_byte_chars() -> Vec<char> {
    let mut bytes: Vec<u32> = (u32::from(b'!')..=u32::from(b'~'))
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars = bytes.clone();
    // Bytes that are not printable map to 256, 257, ... in byte order.
    let mut next = 256;
    for b in 0..256 {
        if !bytes.contains(&b) {
            bytes.push(b);
            chars.push(next);
            next += 1;
        }
    }
    chars.into_iter().filter_map(char::from_u32).collect()
}

type InnerStream<'a> = DecodeStream<
    'a,
    tokenizers::ModelWrapper,
    tokenizers::NormalizerWrapper,
    tokenizers::PreTokenizerWrapper,
    tokenizers::PostProcessorWrapper,
    tokenizers::DecoderWrapper,
>;

/// Turns ids into text as they are generated. A character split over several tokens (emoji, CJK)
/// is held back until its last byte arrives, so printed text never contains a broken character.
pub struct TextStream<'a> {
    tokenizer: &'a Tokenizer,
    inner: InnerStream<'a>,
    /// Ids pushed since the last text returned.
    pending: Vec<u32>,
}

impl TextStream<'_> {
    /// Adds one id; returns the text it completes, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.pending.push(id);
        let (tokenizer, inner) = (self.tokenizer, &mut self.inner);
        let text = catch_panic(|| inner.step(id))
            .map_err(|msg| tokenizer.panicked("decode tokens", &msg))?
            .map_err(|e| tokenizer.error(format!("cannot decode tokens: {e}")))?;
        if text.is_some() {
            self.pending.clear();
        }
        Ok(text)
    }

    /// The text of ids still held back (bytes that never completed a character decode to
    /// U+FFFD), or `None`; call it once the last id is in.
    pub fn finish(&mut self) -> Result<Option<String>> {
        if self.pending.is_empty() {
            return Ok(None);
        }
        let text = self.tokenizer.decode(&self.pending)?;
        self.pending.clear();
        Ok(Some(text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_holds_every_byte_utf8_can() {
        let bytes: std::collections::BTreeSet<u8> = probe().bytes().collect();
        let all = (0..=255u8).filter(|b| !matches!(b, 0xC0 | 0xC1 | 0xF5..=0xFF));
        assert_eq!(bytes, all.collect());
    }

    #[test]
    fn ids_past_the_embedding_are_refused() -> Result<()> {
        let tok = Tokenizer::bytes_only(50256)?;
        tok.check_vocab_size(50257)?;
        let err = tok.check_vocab_size(50256).err().map(|e| e.to_string());
        let err = err.unwrap_or_default();
        assert!(
            err.contains("GPT-2's byte tokens: token `<|endoftext|>` has id 50256, outside"),
            "{err}"
        );
        Ok(())
    }

    #[test]
    fn bytes_only_uses_gpt2_byte_ids() -> Result<()> {
        let tok = Tokenizer::bytes_only(50256)?;
        // GPT-2: "!" = 0, "A" = 32, " " (byte 32, shown as Ġ) = 220, "\n" (Ċ) = 198.
        assert_eq!(tok.encode("!A \n")?, [0, 32, 220, 198]);
        let text = "héllo 🦀 <|endoftext|>";
        let ids = tok.encode(text)?;
        assert_eq!(ids.last(), Some(&50256));
        assert_eq!(ids.len(), "héllo 🦀 ".len() + 1);
        assert_eq!(tok.decode(&ids)?, text);
        Ok(())
    }
}
