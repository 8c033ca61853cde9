//! The poller's error paths against the SDK's mocks (aws-smithy-mocks): no EC2 can be
//! had here; `tests/tests/live.rs` runs the real requests against moto.

use std::collections::BTreeSet;

use aws_sdk_ec2::operation::describe_network_interfaces::DescribeNetworkInterfacesOutput;
use aws_sdk_ec2::operation::describe_security_groups::{
    DescribeSecurityGroupsError, DescribeSecurityGroupsOutput,
};
use aws_sdk_ec2::types::{IpPermission, NetworkInterface, UserIdGroupPair};
use aws_smithy_mocks::{RuleMode, mock, mock_client};
use aws_smithy_types::error::ErrorMetadata;

use super::schedule::retry_wait;
use super::*;

fn identity() -> Identity {
    Identity {
        instance_id: "i-1".into(),
        region: "eu-west-1".into(),
        mac: "0a:00:00:00:00:01".into(),
        primary_ips: vec!["10.0.1.10".parse().unwrap()],
        security_groups: vec!["sg-node".into()],
        vpc_cidrs: vec!["10.0.0.0/16".into()],
    }
}

fn throttled() -> DescribeSecurityGroupsError {
    DescribeSecurityGroupsError::generic(
        ErrorMetadata::builder()
            .code("RequestLimitExceeded")
            .message("Request limit exceeded.")
            .build(),
    )
}

#[tokio::test]
async fn throttling_is_an_error_that_backs_off_exponentially() {
    let no_enis = mock!(aws_sdk_ec2::Client::describe_network_interfaces)
        .then_output(|| DescribeNetworkInterfacesOutput::builder().build());
    let throttle = mock!(aws_sdk_ec2::Client::describe_security_groups).then_error(throttled);
    let client = mock_client!(aws_sdk_ec2, RuleMode::MatchAny, [&no_enis, &throttle]);
    let wanted = BTreeSet::from(["sg-node".to_string()]);
    let error = poll(&client, &identity(), &wanted).await.unwrap_err();
    assert!(error.is_throttling(), "{error:?}");
    assert_eq!(error.operation, "DescribeSecurityGroups");
    let interval = Duration::from_secs(30);
    let waits: Vec<_> = (1..=10)
        .map(|n| retry_wait(&error, n, interval).as_secs())
        .collect();
    assert_eq!(waits, [2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
    let other = Ec2Error {
        operation: "DescribeSecurityGroups",
        code: Some("UnauthorizedOperation".into()),
        message: String::new(),
    };
    let waits: Vec<_> = (1..=7)
        .map(|n| retry_wait(&other, n, interval).as_secs())
        .collect();
    assert_eq!(
        waits,
        [1, 2, 4, 8, 16, 30, 30],
        "other errors: up to the interval"
    );
}

#[tokio::test]
async fn referenced_groups_are_followed_and_their_members_listed() {
    let trunk = mock!(aws_sdk_ec2::Client::describe_network_interfaces)
        .match_requests(|r| {
            r.filters()
                .iter()
                .any(|f| f.name() == Some("attachment.instance-id"))
        })
        .then_output(|| {
            DescribeNetworkInterfacesOutput::builder()
                .network_interfaces(
                    NetworkInterface::builder()
                        .network_interface_id("eni-trunk")
                        .mac_address("0A:00:00:00:00:02")
                        .build(),
                )
                .build()
        });
    let other_enis = mock!(aws_sdk_ec2::Client::describe_network_interfaces)
        .then_output(|| DescribeNetworkInterfacesOutput::builder().build());
    let node_group = mock!(aws_sdk_ec2::Client::describe_security_groups)
        .match_requests(|r| r.filters()[0].values() == ["sg-node"])
        .then_output(|| {
            let rule = IpPermission::builder()
                .ip_protocol("-1")
                .user_id_group_pairs(UserIdGroupPair::builder().group_id("sg-peer").build())
                .build();
            DescribeSecurityGroupsOutput::builder()
                .security_groups(
                    SecurityGroup::builder()
                        .group_id("sg-node")
                        .ip_permissions(rule)
                        .build(),
                )
                .build()
        });
    let peer_group = mock!(aws_sdk_ec2::Client::describe_security_groups)
        .match_requests(|r| r.filters()[0].values() == ["sg-peer"])
        .then_output(|| {
            DescribeSecurityGroupsOutput::builder()
                .security_groups(SecurityGroup::builder().group_id("sg-peer").build())
                .build()
        });
    let client = mock_client!(
        aws_sdk_ec2,
        RuleMode::MatchAny,
        [&trunk, &other_enis, &node_group, &peer_group]
    );
    let wanted = BTreeSet::from(["sg-node".to_string()]);
    let (documents, node) = poll(&client, &identity(), &wanted).await.unwrap();
    assert_eq!(node.trunk_mac.as_deref(), Some("0a:00:00:00:00:02"));
    assert_eq!(node.trunk_id.as_deref(), Some("eni-trunk"));
    let groups = documents
        .files()
        .find(|(n, _)| *n == "ec2-security-groups.json")
        .unwrap()
        .1;
    let groups: Value = serde_json::from_str(groups).unwrap();
    let ids: Vec<_> = groups["SecurityGroups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["GroupId"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        ["sg-node", "sg-peer"],
        "the referenced group, transitively"
    );
    assert_eq!(peer_group.num_calls(), 1);
    // The trunk's branch ENIs and the referenced group's members were asked for.
    assert_eq!(other_enis.num_calls(), 2);
}
