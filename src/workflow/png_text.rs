//! The workflow text chunks of a PNG that ComfyUI saved.
//!
//! `SaveImage` writes the API prompt as a `tEXt` chunk named `prompt` and the frontend's graph as
//! `workflow` (PIL writes `iTXt` instead when the text is not Latin-1, and other tools compress
//! into `zTXt`). The chunks come before the image data, so the pixels are never decoded unless
//! the chunks were not found there.

use std::io::{BufRead, Seek};

use png::{Decoder, Limits};

use super::{MAX_WORKFLOW_BYTES, WorkflowError};

/// The eight bytes every PNG starts with.
pub(crate) const SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', b'\r', b'\n', 0x1a, b'\n'];

/// Memory the decoder may use for chunks: both workflow chunks at their limit, plus room.
const DECODER_LIMIT_BYTES: usize = 3 * MAX_WORKFLOW_BYTES;

/// Text of the chunks the resolver reads.
#[derive(Debug, Default)]
pub(crate) struct WorkflowChunks {
    /// The `workflow` chunk (UI graph).
    pub workflow: Option<String>,
    /// The `prompt` chunk (API graph).
    pub prompt: Option<String>,
    /// Chunks that could not be read.
    pub warnings: Vec<String>,
}

impl WorkflowChunks {
    fn found_any(&self) -> bool {
        self.workflow.is_some() || self.prompt.is_some()
    }
}

/// Reads the `workflow` and `prompt` text chunks (keyword compared case-insensitively).
pub(crate) fn workflow_chunks(
    reader: impl BufRead + Seek,
) -> Result<WorkflowChunks, WorkflowError> {
    let decoder = Decoder::new_with_limits(
        reader,
        Limits {
            bytes: DECODER_LIMIT_BYTES,
        },
    );
    let mut png = decoder
        .read_info()
        .map_err(|e| WorkflowError::Png(e.to_string()))?;
    let mut chunks = WorkflowChunks::default();
    collect(png.info(), &mut chunks);
    if !chunks.found_any() {
        // Text chunks after the image data: reading them means reading past the pixels.
        png.finish()
            .map_err(|e| WorkflowError::Png(e.to_string()))?;
        chunks = WorkflowChunks::default();
        collect(png.info(), &mut chunks);
    }
    if !chunks.found_any() && chunks.warnings.is_empty() {
        return Err(WorkflowError::NoWorkflowInPng);
    }
    Ok(chunks)
}

fn collect(info: &png::Info<'_>, chunks: &mut WorkflowChunks) {
    for chunk in &info.uncompressed_latin1_text {
        keep(chunks, &chunk.keyword, Ok(chunk.text.clone()));
    }
    for chunk in &info.compressed_latin1_text {
        let mut chunk = chunk.clone();
        let text = chunk
            .decompress_text_with_limit(MAX_WORKFLOW_BYTES)
            .and_then(|()| chunk.get_text());
        keep(chunks, &chunk.keyword, text);
    }
    for chunk in &info.utf8_text {
        let mut chunk = chunk.clone();
        let text = chunk
            .decompress_text_with_limit(MAX_WORKFLOW_BYTES)
            .and_then(|()| chunk.get_text());
        keep(chunks, &chunk.keyword, text);
    }
}

fn keep(chunks: &mut WorkflowChunks, keyword: &str, text: Result<String, png::DecodingError>) {
    let slot = if keyword.eq_ignore_ascii_case("workflow") {
        &mut chunks.workflow
    } else if keyword.eq_ignore_ascii_case("prompt") {
        &mut chunks.prompt
    } else {
        return;
    };
    if slot.is_some() {
        return;
    }
    match text {
        Ok(text) if text.len() <= MAX_WORKFLOW_BYTES => *slot = Some(text),
        Ok(text) => chunks.warnings.push(format!(
            "the PNG's {keyword:?} chunk is {} bytes, more than the limit of {MAX_WORKFLOW_BYTES}",
            text.len()
        )),
        Err(e) => chunks
            .warnings
            .push(format!("the PNG's {keyword:?} chunk cannot be read: {e}")),
    }
}
