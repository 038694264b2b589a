//! Attention as data: JSON, written layer by layer as the layers arrive, and npy and safetensors,
//! whose arrays have a fixed place in the file and are filled a block of query rows at a time
//! (headers first: every size is known before the forward pass).

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

use super::{Header, LayerAttention, Output, RowBlock, Sink};
use crate::error::{Error, Result};
use crate::output::{commit_together, Out, PendingFile};

/// `{"model", "tokens", "token_ids", "heads", "layer", "attention"}` with `attention[head][query][key]`;
/// with `--layer all`, `"layers": [{"layer", "attention"}, ...]` instead of the last two. Values are
/// the f32 probabilities, written so that parsing them back gives the same f32.
pub(crate) struct JsonSink {
    out: Out,
    all: bool,
    first: bool,
}

impl JsonSink {
    pub(crate) fn new(mut out: Out, h: &Header<'_>) -> Result<Self> {
        out.bytes(b"{\"model\":")?;
        out.json(h.model)?;
        out.bytes(b",\"tokens\":")?;
        out.json(&h.tokens.text)?;
        out.bytes(b",\"token_ids\":")?;
        out.json(&h.tokens.ids)?;
        out.bytes(b",\"heads\":")?;
        out.json(&h.selection.heads)?;
        let all = h.selection.all_layers;
        if all {
            out.bytes(b",\"layers\":[")?;
        }
        Ok(Self {
            out,
            all,
            first: true,
        })
    }

    fn matrix(&mut self, a: &LayerAttention) -> Result<()> {
        self.out.bytes(b"[")?;
        for i in 0..a.heads.len() {
            self.out.bytes(if i == 0 { b"[" } else { b",[" })?;
            for q in 0..a.len {
                if q > 0 {
                    self.out.bytes(b",")?;
                }
                self.out.json(a.row(i, q))?;
            }
            self.out.bytes(b"]")?;
        }
        self.out.bytes(b"]")
    }
}

impl Sink for JsonSink {
    fn layer(&mut self, a: &LayerAttention) -> Result<()> {
        if self.all {
            self.out.bytes(if self.first { b"{" } else { b",{" })?;
        } else {
            self.out.bytes(b",")?;
        }
        self.out
            .text(format_args!("\"layer\":{},\"attention\":", a.layer))?;
        self.matrix(a)?;
        if self.all {
            self.out.bytes(b"}")?;
        }
        self.first = false;
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> Result<()> {
        self.out.bytes(if self.all { b"]}\n" } else { b"}\n" })?;
        self.out.finish()
    }
}

/// An f32 array (layers, heads, T, T) stored whole at `data_start` of a file after a format's
/// header (npy, safetensors), filled one block of query rows at a time: the rows of one
/// (layer, head) are contiguous, so each block is one seek and one write per (layer, head).
pub(crate) struct DenseFile {
    file: PendingFile,
    /// npy's tokens file: committed with the array ([`commit_together`]).
    sidecar: Option<Sidecar>,
    data_start: u64,
    heads: usize,
    t: usize,
}

impl DenseFile {
    /// An `.npy` (format 1.0, float32 little-endian) of shape (heads, q, k), or (layers, heads,
    /// q, k) with `--layer all`, and a `.json` beside it with the tokens.
    pub(crate) fn npy(path: &Path, h: &Header<'_>) -> Result<Self> {
        let t = h.tokens.len();
        let mut shape = vec![h.selection.heads.len(), t, t];
        if h.selection.all_layers {
            shape.insert(0, h.selection.layers.len());
        }
        // Opened before the array: both destinations are checked before any work.
        let side = Output::npy_tokens_path(path)
            .map(|p| PendingFile::create(&p))
            .transpose()?;
        let meta = serde_json::json!({
            "model": h.model,
            "array": path.file_name().map(|f| f.to_string_lossy()),
            "shape": shape,
            "axes": if h.selection.all_layers {
                vec!["layer", "head", "query", "key"]
            } else {
                vec!["head", "query", "key"]
            },
            "layers": h.selection.layers,
            "heads": h.selection.heads,
            "tokens": h.tokens.text,
            "token_ids": h.tokens.ids,
        });
        let header = npy_header(&shape);
        let mut file = Self::create(path, &header, h)?;
        let Some(side) = side else {
            return Ok(file);
        };
        let mut head = crc32fast::Hasher::new();
        head.update(&header);
        let segments = h.selection.layers.len() * h.selection.heads.len();
        file.sidecar = Some(Sidecar {
            file: side,
            meta,
            head,
            segments: vec![crc32fast::Hasher::new(); segments],
            bytes: header.len() as u64 + 4 * (segments * t * t) as u64,
        });
        Ok(file)
    }

    /// A safetensors file with one F32 tensor `attn.{layer}` of shape (heads, q, k) per layer; the
    /// metadata holds `model`, and `tokens`, `token_ids`, `heads` and `layers` as JSON strings
    /// (safetensors metadata values are strings).
    pub(crate) fn safetensors(path: &Path, h: &Header<'_>) -> Result<Self> {
        let t = h.tokens.len();
        let heads = h.selection.heads.len();
        let metadata = [
            ("model", h.model.to_string()),
            ("tokens", json(&h.tokens.text)),
            ("token_ids", json(&h.tokens.ids)),
            ("heads", json(&h.selection.heads)),
            ("layers", json(&h.selection.layers)),
            (
                "layout",
                "attn.{layer}: (head, query, key) post-softmax attention, rows sum to 1".into(),
            ),
        ];
        let tensors = h
            .selection
            .layers
            .iter()
            .map(|l| (format!("attn.{l}"), vec![heads, t, t]));
        let header = safetensors_header(&metadata, tensors)?;
        Self::create(path, &header, h)
    }

    fn create(path: &Path, header: &[u8], h: &Header<'_>) -> Result<Self> {
        let mut file = PendingFile::create(path)?;
        if file.file().stream_position().is_err() {
            return Err(Error::param(
                "out",
                format!(
                    "{}: npy and safetensors are filled in place, out of order: they need a file, not a pipe",
                    path.display()
                ),
            ));
        }
        file.file()
            .write_all(header)
            .map_err(|e| Error::io(path, e))?;
        Ok(Self {
            file,
            sidecar: None,
            data_start: header.len() as u64,
            heads: h.selection.heads.len(),
            t: h.tokens.len(),
        })
    }

    /// Writes `b`'s rows of every layer and head in place.
    pub(crate) fn write_block(&mut self, b: &RowBlock) -> Result<()> {
        let (t, n) = (self.t, b.rows.len() * self.t);
        let mut bytes = Vec::with_capacity(n * 4);
        for l in 0..b.layers.len() {
            for i in 0..self.heads {
                let at = ((l * self.heads + i) * t + b.rows.start) * t;
                let part = &b.data[(l * self.heads + i) * n..][..n];
                bytes.clear();
                part.iter()
                    .for_each(|v| bytes.extend_from_slice(&v.to_le_bytes()));
                if let Some(side) = &mut self.sidecar {
                    // Blocks come in row order: each (layer, head) is hashed front to back.
                    side.segments[l * self.heads + i].update(&bytes);
                }
                let start = self.data_start + 4 * at as u64;
                let file = self.file.file();
                file.seek(SeekFrom::Start(start))
                    .and_then(|_| file.write_all(&bytes))
                    .map_err(|e| Error::io(self.file.path(), e))?;
            }
        }
        Ok(())
    }

    /// Moves the array and its tokens file into place together.
    pub(crate) fn finish(self) -> Result<()> {
        match self.sidecar {
            None => self.file.commit(),
            Some(side) => {
                let mut crc = side.head;
                side.segments.iter().for_each(|s| crc.combine(s));
                let tokens = tokens_file(side.file, side.meta, side.bytes, crc.finalize())?;
                commit_together(vec![self.file, tokens])
            }
        }
    }
}

/// An npy array's tokens file, written when the array is complete, and the array's CRC-32 so far.
struct Sidecar {
    file: PendingFile,
    meta: serde_json::Value,
    /// The header's CRC, then each (layer, head)'s rows' (the file's order).
    head: crc32fast::Hasher,
    segments: Vec<crc32fast::Hasher>,
    bytes: u64,
}

/// Writes an npy array's tokens file: `meta` with the array's size and CRC-32 (`zlib.crc32` of
/// the whole `.npy`), by which a reader can tell that the two files belong together.
pub(crate) fn tokens_file(
    mut file: PendingFile,
    mut meta: serde_json::Value,
    array_bytes: u64,
    array_crc32: u32,
) -> Result<PendingFile> {
    meta["array_bytes"] = array_bytes.into();
    meta["array_crc32"] = array_crc32.into();
    let mut text = meta.to_string();
    text.push('\n');
    let written = file.file().write_all(text.as_bytes());
    written.map_err(|e| file.write_error(e))?;
    Ok(file)
}

/// A whole f32 array of `shape` (C order) as an `.npy` at `path`, with `meta` in `PATH.json`
/// beside it ([`Output::npy_tokens_path`]; `array`, `shape`, `array_bytes` and `array_crc32`
/// added), the two moved into place together; to a stream (`/dev/stdout`), the array alone.
/// The writer of every whole npy array: recorded attention (`generated.rs`), patching results.
pub fn write_npy(
    path: &Path,
    shape: &[usize],
    data: &[f32],
    mut meta: serde_json::Value,
) -> Result<()> {
    if shape.iter().product::<usize>() != data.len() {
        return Err(Error::Internal(format!(
            "an npy array of shape {shape:?} given {} values",
            data.len()
        )));
    }
    let mut file = PendingFile::create(path)?;
    let side = Output::npy_tokens_path(path)
        .map(|p| PendingFile::create(&p))
        .transpose()?;
    let mut bytes = npy_header(shape);
    bytes.reserve(4 * data.len());
    data.iter()
        .for_each(|v| bytes.extend_from_slice(&v.to_le_bytes()));
    let written = file.file().write_all(&bytes);
    written.map_err(|e| file.write_error(e))?;
    match side {
        Some(side) => {
            meta["array"] = path.file_name().map(|f| f.to_string_lossy()).into();
            meta["shape"] = shape.into();
            let side = tokens_file(side, meta, bytes.len() as u64, crc32fast::hash(&bytes))?;
            commit_together(vec![file, side])
        }
        None => file.commit(),
    }
}

/// The header of a C-order `<f4` array of `shape`: magic, version 1.0, then a Python dict literal
/// padded with spaces so the data starts on a 64-byte boundary, as `numpy.save` writes it.
pub(crate) fn npy_header(shape: &[usize]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
    let shape = match dims.as_slice() {
        [one] => format!("({one},)"),
        _ => format!("({})", dims.join(", ")),
    };
    let mut dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
    let unpadded = 10 + dict.len() + 1;
    dict.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    dict.push('\n');
    let mut header = b"\x93NUMPY\x01\x00".to_vec();
    header.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    header.extend_from_slice(dict.as_bytes());
    header
}

/// The header of a safetensors file whose data is the F32 `tensors` (name, shape), one after the
/// other in the order given, with `metadata`: its length (8 bytes, little-endian), then the JSON,
/// padded with spaces so that the data starts 8-byte aligned, as `safetensors::serialize` writes
/// it. The one writer of our safetensors headers: the attention is written after it a block of
/// rows at a time ([`DenseFile`]), or whole (`generated.rs`).
pub(crate) fn safetensors_header(
    metadata: &[(&str, String)],
    tensors: impl IntoIterator<Item = (String, Vec<usize>)>,
) -> Result<Vec<u8>> {
    use safetensors::tensor::{Dtype, Metadata, TensorInfo};
    let too_large = |e: &dyn std::fmt::Display| {
        Error::Input(format!(
            "the attention is too large for a safetensors file ({e})"
        ))
    };
    let mut start = 0usize;
    let mut infos = Vec::new();
    for (name, shape) in tensors {
        let end = shape
            .iter()
            .try_fold(Dtype::F32.bitsize() / 8, |n, &d| n.checked_mul(d))
            .and_then(|len| start.checked_add(len))
            .ok_or_else(|| too_large(&"its size overflows"))?;
        let info = TensorInfo {
            dtype: Dtype::F32,
            shape,
            data_offsets: (start, end),
        };
        infos.push((name, info));
        start = end;
    }
    let metadata = metadata
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    // safetensors' own header type, which checks that the offsets follow the shapes.
    let header = Metadata::new(Some(metadata), infos).map_err(|e| too_large(&e))?;
    // Through a serde_json::Value, whose keys are sorted: the header is the same bytes in every
    // run, where serializing the Metadata itself would follow its HashMap's order of the day.
    let mut text = serde_json::to_value(&header)
        .map_err(|e| too_large(&e))?
        .to_string();
    let len = text.len().next_multiple_of(8);
    text.push_str(&" ".repeat(len - text.len()));
    let mut bytes = (len as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(text.as_bytes());
    Ok(bytes)
}

/// A list as JSON text. Lists of strings and numbers always serialize.
fn json<T: serde::Serialize>(value: &[T]) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_header_is_aligned_and_names_the_shape() {
        for shape in [vec![4, 16, 16], vec![12, 12, 1024, 1024], vec![3]] {
            let h = npy_header(&shape);
            assert_eq!(h.len() % 64, 0);
            assert_eq!(&h[..8], b"\x93NUMPY\x01\x00");
            assert_eq!(u16::from_le_bytes([h[8], h[9]]) as usize, h.len() - 10);
            assert_eq!(h.last(), Some(&b'\n'));
            let text = String::from_utf8_lossy(&h[10..]);
            assert!(text.contains("'descr': '<f4'"), "{text}");
        }
        let h = npy_header(&[3]);
        assert!(String::from_utf8_lossy(&h).contains("'shape': (3,)"));
        let h = npy_header(&[2, 4, 5, 5]);
        assert!(String::from_utf8_lossy(&h).contains("'shape': (2, 4, 5, 5)"));
    }

    #[test]
    fn safetensors_header_is_aligned_sorted_and_read_back() {
        let metadata = [("model", "m".to_string()), ("layout", "x".to_string())];
        let tensors = [("attn.2", vec![1, 2, 2]), ("attn.10", vec![1, 2, 3])]
            .map(|(n, s)| (n.to_string(), s));
        let h = safetensors_header(&metadata, tensors).unwrap();
        let n = u64::from_le_bytes(h[..8].try_into().unwrap()) as usize;
        assert_eq!((n % 8, h.len()), (0, 8 + n));
        // Keys sorted (every run the same bytes); offsets in the order given.
        assert_eq!(
            String::from_utf8_lossy(&h[8..]).trim_end(),
            "{\"__metadata__\":{\"layout\":\"x\",\"model\":\"m\"},\
             \"attn.10\":{\"data_offsets\":[16,40],\"dtype\":\"F32\",\"shape\":[1,2,3]},\
             \"attn.2\":{\"data_offsets\":[0,16],\"dtype\":\"F32\",\"shape\":[1,2,2]}}"
        );
        let mut file = h.clone();
        file.extend((0..10u32).flat_map(|i| (i as f32).to_le_bytes()));
        let st = safetensors::SafeTensors::deserialize(&file).unwrap();
        let a10 = st.tensor("attn.10").unwrap();
        assert_eq!(
            (a10.shape(), &a10.data()[..4]),
            (&[1, 2, 3][..], &4f32.to_le_bytes()[..])
        );
        assert_eq!(
            safetensors_header(&metadata, [("x".to_string(), vec![usize::MAX, 2])])
                .unwrap_err()
                .to_string(),
            "the attention is too large for a safetensors file (its size overflows)"
        );
    }
}
