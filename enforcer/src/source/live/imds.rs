//! Node identity from the instance metadata service (IMDSv2, aws-config's client:
//! `AWS_EC2_METADATA_SERVICE_ENDPOINT` and the profile settings apply): instance,
//! region, and the primary ENI's MAC, addresses, groups and VPC CIDRs.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use aws_config::imds::Client;
use aws_config::imds::client::error::ImdsError;
use aws_config::provider_config::ProviderConfig;
use aws_smithy_http_client::tls;
use aws_smithy_types::error::display::DisplayErrorContext;

use super::hub::{Hub, Identity, names};

/// Waits before IMDS is asked again after a failure: doubling, up to 30 s.
const RETRY: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(30));

/// A failed metadata request.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("IMDS {path}: {message}")]
    Imds { path: String, message: String },
    #[error("IMDS {path}: {value:?} is not an IP address")]
    Address { path: String, value: String },
}

/// The HTTPS client of every AWS call: rustls with ring (no cmake-built crypto).
pub fn https_client() -> aws_sdk_ec2::config::SharedHttpClient {
    aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(
            tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https()
}

/// A metadata client as aws-config configures it from the environment.
pub fn client() -> Client {
    let config = ProviderConfig::default().with_http_client(https_client());
    Client::builder().configure(&config).build()
}

/// Reads the identity, then again every `interval` (a primary ENI's groups may be
/// modified); failures are retried with backoff and never drop the last identity.
pub fn spawn(client: Client, hub: Arc<Hub>, interval: Duration) {
    tokio::spawn(async move {
        let mut wait = RETRY.0;
        loop {
            match identity(&client).await {
                Ok(identity) => {
                    if hub.identity().as_ref() != Some(&identity) {
                        log::info!(
                            "node identity: instance {}, region {}, primary ENI {}",
                            identity.instance_id,
                            identity.region,
                            identity.mac
                        );
                    }
                    hub.publish_identity(identity);
                    wait = RETRY.0;
                    tokio::time::sleep(interval).await;
                }
                Err(error) => {
                    hub.failed(names::IMDS, error.to_string());
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(RETRY.1);
                }
            }
        }
    });
}

async fn get(client: &Client, path: &str) -> Result<String, IdentityError> {
    client
        .get(format!("/latest/meta-data/{path}"))
        .await
        .map(|v| String::from(v).trim().to_string())
        .map_err(|e| failed(path, &e))
}

/// An IMDS error in a line: an error response by its status alone (the SDK's
/// description of it spans the whole response).
fn failed(path: &str, error: &ImdsError) -> IdentityError {
    let message = match error {
        ImdsError::ErrorResponse(response) => {
            format!("HTTP {}", response.response().status().as_u16())
        }
        other => DisplayErrorContext(other).to_string(),
    };
    IdentityError::Imds {
        path: path.to_string(),
        message,
    }
}

/// A list IMDS may not have (`ipv6s` on an IPv4-only ENI): a 404 is an empty list.
async fn list(client: &Client, path: &str) -> Result<Vec<String>, IdentityError> {
    match client.get(format!("/latest/meta-data/{path}")).await {
        Ok(value) => Ok(String::from(value)
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect()),
        Err(ImdsError::ErrorResponse(response)) if response.response().status().as_u16() == 404 => {
            Ok(Vec::new())
        }
        Err(e) => Err(failed(path, &e)),
    }
}

/// This instance as IMDS describes it now.
pub async fn identity(client: &Client) -> Result<Identity, IdentityError> {
    let instance_id = get(client, "instance-id").await?;
    let region = get(client, "placement/region").await?;
    let mac = get(client, "mac").await?.to_ascii_lowercase();
    let eni = format!("network/interfaces/macs/{mac}");
    let mut primary_ips = Vec::new();
    for family in ["local-ipv4s", "ipv6s"] {
        let path = format!("{eni}/{family}");
        for value in list(client, &path).await? {
            let ip: IpAddr = value.parse().map_err(|_| IdentityError::Address {
                path: path.clone(),
                value: value.clone(),
            })?;
            primary_ips.push(ip);
        }
    }
    let security_groups = list(client, &format!("{eni}/security-group-ids")).await?;
    let mut vpc_cidrs = list(client, &format!("{eni}/vpc-ipv4-cidr-blocks")).await?;
    vpc_cidrs.extend(list(client, &format!("{eni}/vpc-ipv6-cidr-blocks")).await?);
    Ok(Identity {
        instance_id,
        region,
        mac,
        primary_ips,
        security_groups,
        vpc_cidrs,
    })
}
