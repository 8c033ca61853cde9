//! Stand-ins for what the live sources (`enforcer run --source cluster`) read, since no
//! cluster and no AWS account can be had here: a Kubernetes API server that lists and
//! watches (`kube_api`), an IMDSv2 responder (`imds`) and moto's EC2 (`moto`).

pub mod example;
pub mod imds;
pub mod kube_api;
pub mod moto;
