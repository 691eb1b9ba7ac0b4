//! Progress bars of running copies (indicatif), for `status --watch` and `prefetch --wait`.

/// One progress bar per running copy (the "visual copy status indicator").
pub(crate) struct Bars {
    multi: indicatif::MultiProgress,
    header: indicatif::ProgressBar,
    bars: std::collections::HashMap<String, indicatif::ProgressBar>,
}

impl Bars {
    pub(crate) fn new() -> Self {
        let multi = indicatif::MultiProgress::new();
        let header = multi.add(indicatif::ProgressBar::new_spinner());
        header.set_style(indicatif::ProgressStyle::with_template("{msg}").expect("template"));
        Self {
            multi,
            header,
            bars: Default::default(),
        }
    }

    /// Whether the bars are drawn (stderr is a terminal).
    pub(crate) fn on_terminal(&self) -> bool {
        !self.multi.is_hidden()
    }

    /// The line above the bars.
    pub(crate) fn set_header(&self, line: String) {
        self.header.set_message(line);
    }

    /// Shows the running copies of `jobs`; bars of copies that ended are finished.
    pub(crate) fn update(&mut self, jobs: &[serde_json::Value]) {
        let style = indicatif::ProgressStyle::with_template(
            "{wide_msg} {bar:30} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("template");
        let mut seen = std::collections::HashSet::new();
        for j in jobs.iter().filter(|j| j["state"] == "running") {
            let path = j["path"].as_str().unwrap_or("?").to_string();
            seen.insert(path.clone());
            let bar = self.bars.entry(path.clone()).or_insert_with(|| {
                let b = self.multi.add(indicatif::ProgressBar::new(0));
                b.set_style(style.clone());
                b.set_message(path.clone());
                b
            });
            bar.set_length(j["total_bytes"].as_u64().unwrap_or(0));
            bar.set_position(j["done_bytes"].as_u64().unwrap_or(0));
        }
        self.bars.retain(|path, bar| {
            if seen.contains(path) {
                return true;
            }
            bar.finish();
            false
        });
    }
}
