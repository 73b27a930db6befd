//! `gpulet keygen`: an Ed25519 key pair for signed commands.

use std::path::PathBuf;

use clap::Args as ClapArgs;
use gpulet::error::Error;
use gpulet::mqtt;

#[derive(Debug, ClapArgs)]
pub struct Args {
    #[arg(value_name = "PREFIX")]
    pub prefix: PathBuf,
}

pub fn run(args: Args) -> Result<(), Error> {
    let Args { prefix } = args;
    let (private, public) = mqtt::command::keygen().map_err(Error::Runtime)?;
    let with = |ext: &str| {
        let mut p = prefix.clone().into_os_string();
        p.push(ext);
        PathBuf::from(p)
    };
    let (key_path, pub_path) = (with(".key"), with(".pub"));
    let write_private = || -> std::io::Result<()> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut f =
            std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&key_path)?;
        writeln!(f, "{private}")
    };
    write_private().map_err(|e| {
        Error::Command(format!(
            "cannot write {}: {e} (an existing key is never overwritten)",
            key_path.display()
        ))
    })?;
    std::fs::write(&pub_path, format!("{public}\n"))
        .map_err(|e| Error::Command(format!("cannot write {}: {e}", pub_path.display())))?;
    println!("private key: {} (keep it secret)", key_path.display());
    println!("public key:  {} = {public}", pub_path.display());
    Ok(())
}
