//! `flotilla trust ls|add|rm`: the keys whose image signatures the cluster trusts.

use hyper::Method;

use flotilla_api::Client;
use flotilla_registry::{Algorithm, SigningKey, TrustedKey, TrustedKeyExt};

use crate::client::{enc, get};
use crate::output::{add_row, print_json, print_table, table};
use crate::{CliError, Format, TrustCmd};

pub async fn run(client: &Client, cmd: TrustCmd) -> Result<(), CliError> {
    match cmd {
        TrustCmd::Ls(f) => {
            let keys: Vec<TrustedKey> = get(client, "/v1/trust/keys").await?;
            if f.format == Format::Json {
                return print_json(&keys);
            }
            let mut t = table(&["KEY ID", "ALGORITHM"]);
            for k in &keys {
                add_row(&mut t, vec![k.id.clone(), k.algorithm.as_str().to_string()]);
            }
            print_table(&t);
            if let Ok(info) = get::<flotilla_types::ClusterInfo>(client, "/v1/cluster").await {
                if let Some(v) = info.settings.get("signature_enforcement") {
                    println!("Signature enforcement: {}", v.as_str().unwrap_or("?"));
                }
            }
            Ok(())
        }
        TrustCmd::Add { file } => {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| CliError::usage(format!("{}: {e}", file.display())))?;
            // A private key is accepted: only its public half leaves this machine.
            let public = if text.contains("PRIVATE KEY") {
                SigningKey::from_pem(&text)
                    .map_err(|e| CliError::usage(format!("{}: {e}", file.display())))?
                    .public_key_pem()
            } else {
                TrustedKey::from_public_key_pem(&text)
                    .map_err(|e| CliError::usage(format!("{}: {e}", file.display())))?;
                text
            };
            let key: TrustedKey = client
                .post_json(
                    "/v1/trust/keys",
                    &serde_json::json!({ "public_key_pem": public }),
                )
                .await?;
            println!("Trusted key {} ({})", key.id, key.algorithm.as_str());
            Ok(())
        }
        TrustCmd::Keygen { file, algorithm } => {
            if file.exists() {
                return Err(CliError::usage(format!(
                    "{} exists: choose another file (keys are never overwritten)",
                    file.display()
                )));
            }
            let alg = if algorithm == "ecdsa-p256" {
                Algorithm::EcdsaP256
            } else {
                Algorithm::Ed25519
            };
            let key = SigningKey::generate_with(alg).map_err(|e| CliError::new(e.to_string()))?;
            key.save(&file)
                .map_err(|e| CliError::new(format!("{}: {e}", file.display())))?;
            let mut public = file.clone().into_os_string();
            public.push(".pub");
            std::fs::write(&public, key.public_key_pem()).map_err(|e| {
                CliError::new(format!("{}: {e}", std::path::Path::new(&public).display()))
            })?;
            println!(
                "Key {} ({algorithm}): private {}, public {}",
                key.key_id(),
                file.display(),
                std::path::Path::new(&public).display()
            );
            println!(
                "Trust it with `flotilla trust add {}`",
                std::path::Path::new(&public).display()
            );
            Ok(())
        }
        TrustCmd::Rm { key_id } => {
            client
                .request(
                    Method::DELETE,
                    &format!("/v1/trust/keys/{}", enc(&key_id)),
                    None,
                )
                .await?;
            println!("Key {key_id} is no longer trusted.");
            Ok(())
        }
    }
}
