//! The load report: medians with ranges over rounds, ratios against nginx, a percentile plot.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

/// One run of one scenario against one server.
#[derive(Debug, Clone, Serialize)]
pub struct Measurement {
    pub scenario: String,
    pub server: String,
    pub mode: String,
    pub requests: u64,
    pub errors: u64,
    pub rps: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub cpu_us_per_request: f64,
    /// CPU of the server over the run, in cores.
    pub cpu_cores: f64,
    pub rss_mb: f64,
    pub peak_rss_mb: f64,
}

/// Median, lowest and highest of one figure over the rounds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

fn spread(values: impl Iterator<Item = f64>) -> Spread {
    let mut v: Vec<f64> = values.filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return Spread {
            median: f64::NAN,
            min: f64::NAN,
            max: f64::NAN,
        };
    }
    v.sort_by(f64::total_cmp);
    Spread {
        median: v[v.len() / 2],
        min: v[0],
        max: v[v.len() - 1],
    }
}

/// One scenario and server over all rounds.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub scenario: String,
    pub server: String,
    pub mode: String,
    pub rounds: usize,
    pub errors: u64,
    pub rps: Spread,
    pub p50_us: Spread,
    pub p90_us: Spread,
    pub p99_us: Spread,
    pub p999_us: Spread,
    pub cpu_us_per_request: Spread,
    pub cpu_cores: Spread,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub machine: String,
    pub seconds_per_run: f64,
    pub rounds: usize,
    pub idle_rss_mb: f64,
    pub peak_rss_mb: f64,
    pub runs: Vec<Measurement>,
}

impl Report {
    pub fn new(seconds: f64, rounds: usize, idle_rss_mb: f64) -> Self {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|c| {
                c.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown CPU".into());
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        Self {
            machine: format!("{cores} cores, {cpu}"),
            seconds_per_run: seconds,
            rounds,
            idle_rss_mb,
            peak_rss_mb: 0.0,
            runs: Vec::new(),
        }
    }

    pub fn add(&mut self, m: Measurement) {
        println!(
            "  {:<28} {:<9} {:>9.0} req/s  p50 {:>7.0} µs  p99 {:>7.0} µs  {:>6.1} µs CPU/req  errors {}",
            m.scenario, m.server, m.rps, m.p50_us, m.p99_us, m.cpu_us_per_request, m.errors
        );
        self.runs.push(m);
    }

    pub fn summaries(&self) -> Vec<Summary> {
        let mut groups: BTreeMap<(usize, String, String), Vec<&Measurement>> = BTreeMap::new();
        let mut order: Vec<(String, String)> = Vec::new();
        for m in &self.runs {
            let key = (m.scenario.clone(), m.server.clone());
            let position = match order.iter().position(|k| *k == key) {
                Some(p) => p,
                None => {
                    order.push(key.clone());
                    order.len() - 1
                }
            };
            groups.entry((position, key.0, key.1)).or_default().push(m);
        }
        groups
            .into_iter()
            .map(|((_, scenario, server), runs)| Summary {
                mode: runs[0].mode.clone(),
                rounds: runs.len(),
                errors: runs.iter().map(|m| m.errors).sum(),
                rps: spread(runs.iter().map(|m| m.rps)),
                p50_us: spread(runs.iter().map(|m| m.p50_us)),
                p90_us: spread(runs.iter().map(|m| m.p90_us)),
                p99_us: spread(runs.iter().map(|m| m.p99_us)),
                p999_us: spread(runs.iter().map(|m| m.p999_us)),
                cpu_us_per_request: spread(runs.iter().map(|m| m.cpu_us_per_request)),
                cpu_cores: spread(runs.iter().map(|m| m.cpu_cores)),
                scenario,
                server,
            })
            .collect()
    }

    fn find<'a>(summaries: &'a [Summary], scenario: &str, server: &str) -> Option<&'a Summary> {
        summaries
            .iter()
            .find(|s| s.scenario == scenario && s.server == server)
    }

    /// fhirgate against nginx on the proxied read, measured in the same run.
    pub fn ratios(&self) -> BTreeMap<&'static str, f64> {
        let s = self.summaries();
        let mut out = BTreeMap::new();
        if let (Some(g), Some(n)) = (
            Self::find(&s, "proxied read", "fhirgate"),
            Self::find(&s, "proxied read", "nginx"),
        ) {
            out.insert("throughput_vs_nginx", g.rps.median / n.rps.median);
            out.insert(
                "cpu_per_request_vs_nginx",
                g.cpu_us_per_request.median / n.cpu_us_per_request.median,
            );
        }
        if let (Some(g), Some(n), Some(u)) = (
            Self::find(&s, "read at one connection", "fhirgate"),
            Self::find(&s, "read at one connection", "nginx"),
            Self::find(&s, "read at one connection", "upstream"),
        ) {
            out.insert("fhirgate_added_p50_us", g.p50_us.median - u.p50_us.median);
            out.insert("nginx_added_p50_us", n.p50_us.median - u.p50_us.median);
        }
        out
    }

    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "Machine: {}. {} rounds of {} s per run after a warm-up; median (min–max).\n",
            self.machine, self.rounds, self.seconds_per_run
        );
        let _ = writeln!(
            out,
            "| scenario | server | load | requests/s | p50 µs | p99 µs | p99.9 µs | server CPU µs/req | errors |\n|---|---|---|---|---|---|---|---|---|"
        );
        let range = |s: Spread, digits: usize| {
            format!("{:.d$} ({:.d$}–{:.d$})", s.median, s.min, s.max, d = digits)
        };
        for s in self.summaries() {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                s.scenario,
                s.server,
                s.mode,
                range(s.rps, 0),
                range(s.p50_us, 0),
                range(s.p99_us, 0),
                range(s.p999_us, 0),
                range(s.cpu_us_per_request, 1),
                s.errors
            );
        }
        let _ = writeln!(out);
        for (name, value) in self.ratios() {
            let _ = writeln!(out, "- {name}: {value:.2}");
        }
        let _ = writeln!(
            out,
            "- fhirgate RSS: {:.1} MB idle, {:.1} MB peak over the run",
            self.idle_rss_mb, self.peak_rss_mb
        );
        out
    }

    /// Latency by percentile (p50, p90, p99, p99.9) for every scenario and server, as SVG.
    pub fn svg(&self) -> String {
        let summaries = self.summaries();
        let (width, height, left, bottom, top, right) = (900.0, 520.0, 70.0, 50.0, 30.0, 290.0);
        let max = summaries
            .iter()
            .map(|s| s.p999_us.median)
            .filter(|v| v.is_finite())
            .fold(1.0, f64::max);
        let y_max = max.log10().ceil().max(1.0);
        let y = |us: f64| top + (height - top - bottom) * (1.0 - us.max(1.0).log10() / y_max);
        let xs = [0.5, 0.9, 0.99, 0.999];
        let x = |i: usize| left + (width - left - right) * i as f64 / (xs.len() - 1) as f64;
        let colors = [
            "#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563", "#ca8a04",
        ];
        let mut svg = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{left}\" y=\"18\" font-size=\"14\">Latency by percentile (median of rounds, log scale)</text>\n"
        );
        for decade in 0..=(y_max as i32) {
            let v = 10f64.powi(decade);
            let _ = writeln!(
                svg,
                "<line x1=\"{left}\" x2=\"{}\" y1=\"{y0:.1}\" y2=\"{y0:.1}\" stroke=\"#e5e7eb\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
                width - right,
                left - 6.0,
                y(v) + 4.0,
                if v >= 1000.0 { format!("{} ms", v / 1000.0) } else { format!("{v} µs") },
                y0 = y(v)
            );
        }
        for (i, p) in ["p50", "p90", "p99", "p99.9"].iter().enumerate() {
            let _ = writeln!(
                svg,
                "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{p}</text>",
                x(i),
                height - bottom + 20.0
            );
        }
        for (n, s) in summaries.iter().enumerate() {
            let color = colors[n % colors.len()];
            let points: Vec<String> = [s.p50_us, s.p90_us, s.p99_us, s.p999_us]
                .iter()
                .enumerate()
                .map(|(i, v)| format!("{:.1},{:.1}", x(i), y(v.median)))
                .collect();
            let _ = writeln!(
                svg,
                "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>",
                points.join(" ")
            );
            let _ = writeln!(
                svg,
                "<text x=\"{}\" y=\"{}\" fill=\"{color}\">{} — {}</text>",
                width - right + 12.0,
                top + 18.0 * n as f64 + 10.0,
                s.scenario,
                s.server
            );
        }
        svg.push_str("</svg>\n");
        svg
    }

    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        let json = serde_json::json!({
            "report": self,
            "summaries": self.summaries(),
            "ratios": self.ratios(),
        });
        std::fs::write(
            dir.join("report.json"),
            serde_json::to_vec_pretty(&json).unwrap_or_default(),
        )?;
        std::fs::write(dir.join("report.md"), self.markdown())?;
        std::fs::write(dir.join("latency.svg"), self.svg())
    }
}
