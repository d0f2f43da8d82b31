//! Writes the man page vhost-user-dmaheap.8 from the clap definition (clap_mangen).
//!
//!     cargo run -q -p vhost-user-dmaheap --example mangen > packaging/man/vhost-user-dmaheap.8
//!
//! tests/check-manpage runs it and compares with the committed page (`--fix` rewrites it).
//! An example rather than a binary or a subcommand: clap_mangen is a dev-dependency and
//! never part of the daemon.
//!
//! One page: clap_mangen's own sections for the daemon, then a SUBCOMMANDS section with the
//! synopsis, description and options of each subcommand, then SEE ALSO. No date, so that
//! the page depends on the clap definition alone.

use std::io::{self, Write};
use std::process::ExitCode;

use clap::CommandFactory;
use clap_mangen::roff::{bold, roman, Roff};
use clap_mangen::Man;

use vhost_user_dmaheap::args::Args;

/// Renders one clap_mangen piece of `man` without roff's preamble (which the page has
/// once, at the top) and, given a `heading`, without its `.SH` line, so that the piece
/// can sit under a heading of ours.
fn piece(
    man: &Man,
    render: fn(&Man, &mut dyn Write) -> io::Result<()>,
    heading: Option<&str>,
) -> io::Result<String> {
    let mut buf = Vec::new();
    render(man, &mut buf)?;
    let text = String::from_utf8(buf).map_err(io::Error::other)?;
    let preamble = Roff::new().render();
    let want = format!(
        "{preamble}{}",
        heading.map(|h| format!(".SH {h}\n")).unwrap_or_default()
    );
    text.strip_prefix(&want).map(str::to_owned).ok_or_else(|| {
        io::Error::other(format!(
            "clap_mangen output does not start with {want:?}: {text:?}"
        ))
    })
}

fn page() -> io::Result<String> {
    let mut cmd = Args::command().disable_help_subcommand(true);
    cmd.build();
    let name = cmd.get_name().to_owned();
    let version = cmd.get_version().unwrap_or_default().to_owned();
    let man = Man::new(cmd.clone()).section("8");

    let subcommands: Vec<(String, Man)> = cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set())
        .map(|s| (format!("{name} {}", s.get_name()), Man::new(s.clone())))
        .collect();

    let mut out = Roff::new().render();
    // Written here: clap_mangen drops an empty date argument, which shifts the others.
    out += &format!(
        ".TH {} 8 \"\" \"{name} {version}\" \"System Administration\"\n",
        name.to_uppercase()
    );
    out += &piece(&man, Man::render_name_section, None)?;
    out += &piece(&man, Man::render_synopsis_section, None)?;
    for (_, sub) in &subcommands {
        out += &Roff::new().control("br", []).to_roff();
        out += &piece(sub, Man::render_synopsis_section, Some("SYNOPSIS"))?;
    }
    out += &piece(&man, Man::render_description_section, None)?;
    out += &piece(&man, Man::render_options_section, None)?;
    out += &Roff::new().control("SH", ["SUBCOMMANDS"]).to_roff();
    for (full, sub) in &subcommands {
        out += &Roff::new().control("SS", [full.as_str()]).to_roff();
        out += &piece(sub, Man::render_description_section, Some("DESCRIPTION"))?;
        out += &piece(sub, Man::render_options_section, Some("OPTIONS"))?;
    }
    out += &Roff::new()
        .control("SH", ["SEE ALSO"])
        .text([
            bold("qemu-system-x86_64"),
            roman("(1), "),
            bold("systemd.socket"),
            roman("(5). The project's README.md, SECURITY.md, and packaging/metrics/README.md for the metrics of "),
            bold("stats --format prometheus"),
            roman("."),
        ])
        .to_roff();
    out += &piece(&man, Man::render_version_section, None)?;
    Ok(out)
}

fn main() -> ExitCode {
    match page().and_then(|p| io::stdout().lock().write_all(p.as_bytes())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mangen: {e}");
            ExitCode::FAILURE
        }
    }
}
