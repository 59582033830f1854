//! `prfaas keygen --out FILE`: make a node identity (ed25519) for `node.identity`.

use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where to write the key (refuses to overwrite; mode 0600).
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let peer = prfaas_node::actors::node::keygen(&args.out)?;
    println!("{peer}");
    eprintln!(
        "wrote {} (keep it private); set `identity = \"{}\"` under [node]",
        args.out.display(),
        args.out.display()
    );
    Ok(())
}
