use std::path::Path;

use aws_sdk_ec2::types::{
    GroupIdentifier as SdkGroup, IpPermission, IpRange as SdkRange, ManagedPrefixList,
    NetworkInterface, NetworkInterfaceAttachment, NetworkInterfacePrivateIpAddress,
    NetworkInterfaceType, PrefixListEntry as SdkEntry, PrefixListId as SdkListId,
    SecurityGroup as SdkGroupDef, UserIdGroupPair,
};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt as _;

use super::*;
use crate::source::live::ec2::shapes;
use crate::source::state::read_documents;

fn sdk_group(id: &str) -> SdkGroupDef {
    SdkGroupDef::builder()
        .group_id(id)
        .group_name(id)
        .vpc_id("vpc-1")
        .ip_permissions(
            IpPermission::builder()
                .ip_protocol("tcp")
                .from_port(443)
                .to_port(443)
                .ip_ranges(SdkRange::builder().cidr_ip("10.0.0.0/16").build())
                .user_id_group_pairs(UserIdGroupPair::builder().group_id("sg-db").build())
                .prefix_list_ids(SdkListId::builder().prefix_list_id("pl-1").build())
                .build(),
        )
        .build()
}

fn sdk_eni(n: u32, kind: Option<NetworkInterfaceType>, instance: Option<&str>) -> NetworkInterface {
    let ip = format!("10.{}.{}.{}", (n >> 16) & 255, (n >> 8) & 255, n & 255);
    NetworkInterface::builder()
        .network_interface_id(format!("eni-{n:08x}"))
        .set_interface_type(kind)
        .mac_address(format!(
            "0A:00:00:00:{:02x}:{:02x}",
            (n >> 8) & 255,
            n & 255
        ))
        .set_attachment(
            instance.map(|i| NetworkInterfaceAttachment::builder().instance_id(i).build()),
        )
        .groups(SdkGroup::builder().group_id("sg-web").build())
        .private_ip_address(&ip)
        .private_ip_addresses(
            NetworkInterfacePrivateIpAddress::builder()
                .private_ip_address(&ip)
                .primary(true)
                .build(),
        )
        .status(aws_sdk_ec2::types::NetworkInterfaceStatus::InUse)
        .build()
}

fn read(
    group: &SdkGroupDef,
    enis: &[NetworkInterface],
) -> (SecurityGroup, Vec<Member>, Vec<PrefixList>) {
    let list = ManagedPrefixList::builder().prefix_list_id("pl-1").build();
    let entry = SdkEntry::builder().cidr("192.0.2.0/24").build();
    (
        from_cli("group", shapes::security_group(group)).unwrap(),
        enis.iter()
            .map(|e| from_cli("eni", shapes::network_interface(e)).unwrap())
            .collect(),
        vec![from_cli("prefix list", shapes::prefix_list(&list, &[entry])).unwrap()],
    )
}

/// The objects of `specs` as the API server would hold them once the controller
/// stamped their status, read at `read_at`.
fn stored(specs: Vec<SecurityGroupViewSpec>, read_at: Timestamp) -> Vec<Arc<SecurityGroupView>> {
    specs
        .into_iter()
        .map(|spec| {
            let mut view = SecurityGroupView::new(&object_name(&spec.group_id, spec.part), spec);
            view.metadata.generation = Some(3);
            view.status = Some(SecurityGroupViewStatus {
                read_at: Time(read_at),
                observed_generation: 3,
                rules: 1,
                members: u32::try_from(view.spec.members.len()).unwrap(),
            });
            Arc::new(view)
        })
        .collect()
}

#[test]
fn the_crd_in_deploy_is_the_generated_one() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/controller/crd.yaml");
    let file = std::fs::read_to_string(&path).unwrap_or_default();
    let generated = crd_yaml();
    assert!(
        file == generated,
        "{} differs from SecurityGroupView::crd(); the generated text:\n{generated}",
        path.display()
    );
}

#[test]
fn views_rebuild_what_the_ec2_poll_writes() {
    let group = sdk_group("sg-web");
    let enis = [
        sdk_eni(1, Some(NetworkInterfaceType::Trunk), Some("i-1")),
        sdk_eni(2, Some(NetworkInterfaceType::Branch), None),
        sdk_eni(3, None, Some("i-2")),
    ];
    let (cli_group, members, lists) = read(&group, &enis);
    let specs = split(cli_group, members, lists, MAX_SPEC_BYTES).unwrap();
    assert_eq!(specs.len(), 1);
    let mut assembly = Assembly::default();
    assert!(assembly.update(&stored(specs, Timestamp::UNIX_EPOCH)));
    let (from_views, node) = assembly.documents("i-1");
    assert_eq!(node.trunk_id.as_deref(), Some("eni-00000001"));
    assert_eq!(node.trunk_mac.as_deref(), Some("0a:00:00:00:00:01"));
    assert_eq!(assembly.documents("i-3").1.trunk_id, None);

    let mut direct = Documents::default();
    direct.insert(GROUPS_FILE, pretty(&shapes::security_groups(&[group])));
    direct.insert(INTERFACES_FILE, pretty(&shapes::network_interfaces(&enis)));
    let list = ManagedPrefixList::builder().prefix_list_id("pl-1").build();
    let entry = SdkEntry::builder().cidr("192.0.2.0/24").build();
    direct.insert(
        prefix_list_file("pl-1"),
        pretty(&shapes::prefix_list(&list, &[entry])),
    );
    let origin = Path::new("cluster");
    let (views, poll) = (
        read_documents(origin, &from_views),
        read_documents(origin, &direct),
    );
    assert!(views.errors.is_empty(), "{:?}", views.errors);
    assert_eq!(format!("{:?}", views.groups), format!("{:?}", poll.groups));
    assert_eq!(
        format!("{:?}", views.interfaces),
        format!("{:?}", poll.interfaces)
    );
    assert_eq!(
        format!("{:?}", views.prefix_lists),
        format!("{:?}", poll.prefix_lists)
    );
    assert_eq!(from_views.files().count(), direct.files().count());
}

/// etcd's limit: a group of 20 000 members is split into objects that each stay
/// under 1.5 MiB, and the parts rebuild every member.
#[test]
fn a_group_over_the_object_limit_is_split_and_rebuilt_whole() {
    const ETCD_REQUEST_LIMIT: usize = 1536 * 1024;
    let enis: Vec<_> = (0..20_000).map(|n| sdk_eni(n, None, None)).collect();
    let (group, members, lists) = read(&sdk_group("sg-web"), &enis);
    let specs = split(group, members, lists, MAX_SPEC_BYTES).unwrap();
    assert!(specs.len() > 2, "{} parts", specs.len());
    for spec in &specs {
        assert!(size(spec) <= MAX_SPEC_BYTES);
        assert_eq!(spec.parts as usize, specs.len());
        assert_eq!(spec.security_group.is_some(), spec.part == 0);
    }
    let objects = stored(specs, Timestamp::UNIX_EPOCH);
    for object in &objects {
        let bytes = serde_json::to_vec(&**object).unwrap().len();
        assert!(
            bytes < ETCD_REQUEST_LIMIT,
            "{} takes {bytes} bytes",
            object.name_any()
        );
        assert!(object.name_any().starts_with("sg-web"));
    }
    let mut assembly = Assembly::default();
    assembly.update(&objects);
    let (documents, _) = assembly.documents("i-1");
    let inventory = read_documents(Path::new("cluster"), &documents);
    assert_eq!(inventory.interfaces.len(), enis.len());

    let (group, mut members, lists) = read(&sdk_group("sg-web"), &enis[..1]);
    members[0].description = Some("x".repeat(MAX_SPEC_BYTES));
    assert!(matches!(
        split(group, members, lists, MAX_SPEC_BYTES),
        Err(ViewError::TooLarge {
            what: "one member",
            ..
        })
    ));
}

#[test]
fn a_group_being_rewritten_keeps_its_last_whole_version() {
    let enis: Vec<_> = (0..300).map(|n| sdk_eni(n, None, None)).collect();
    let (group, members, lists) = read(&sdk_group("sg-web"), &enis);
    let old = split(group.clone(), members.clone(), lists.clone(), 40_000).unwrap();
    assert!(old.len() > 1);
    let mut assembly = Assembly::default();
    let at = Timestamp::from_second(1_000).unwrap();
    assembly.update(&stored(old.clone(), at));
    let count = |a: &Assembly| {
        read_documents(Path::new("c"), &a.documents("i-1").0)
            .interfaces
            .len()
    };
    assert_eq!(count(&assembly), 300);

    // Part 0 rewritten with fewer members, the other parts not yet: the last stays.
    let new = split(group, members[..10].to_vec(), lists, 40_000).unwrap();
    let mut mixed = stored(new.clone(), at);
    mixed.extend(stored(old[1..].to_vec(), at));
    assert!(!assembly.update(&mixed));
    assert_eq!(count(&assembly), 300);

    // A spec whose status is not yet written for it: the last stays.
    let mut unstamped = stored(new.clone(), at);
    Arc::make_mut(&mut unstamped[0]).metadata.generation = Some(4);
    assert!(!assembly.update(&unstamped));
    assert_eq!(count(&assembly), 300);

    // Whole again: taken, dated by the read.
    let later = Timestamp::from_second(2_000).unwrap();
    assert!(assembly.update(&stored(new, later)));
    assert_eq!(count(&assembly), 10);
    assert_eq!(assembly.oldest_read(), Some(SystemTime::from(later)));

    // Its objects deleted: the group goes.
    assert!(assembly.update(&[]));
    assert!(!assembly.has("sg-web"));
}

/// A view is another process's content: a prefix list ID no EC2 would give (a `/`,
/// a leading dot, the empty string) still makes a state file of its own, read back
/// under its ID, instead of panicking the follower.
#[test]
fn any_prefix_list_id_makes_a_file_of_its_own() {
    let ids = [
        "pl-1", "pl-../x", "pl-a/b", ".hidden", "", "pl-a_b", "pl-a-b",
    ];
    let mut documents = Documents::default();
    for id in ids {
        let list = ManagedPrefixList::builder().prefix_list_id(id).build();
        let entry = SdkEntry::builder().cidr("192.0.2.0/24").build();
        documents.insert(
            prefix_list_file(id),
            pretty(&shapes::prefix_list(&list, &[entry])),
        );
    }
    assert_eq!(
        documents.files().count(),
        ids.len(),
        "no two IDs share a file"
    );
    assert!(documents.files().all(|(name, _)| !name.contains('/')));
    let read = read_documents(Path::new("cluster"), &documents);
    let mut read_ids: Vec<&str> = read
        .prefix_lists
        .iter()
        .map(|l| l.item.0.as_str())
        .collect();
    read_ids.sort_unstable();
    let mut expected = ids.to_vec();
    expected.retain(|id| !id.is_empty());
    expected.sort_unstable();
    assert_eq!(read_ids, expected);
    // A list without an ID cannot be attributed: it is the one error (the state
    // is refused, the kernel keeps the last good one), never a panic.
    assert_eq!(read.errors.len(), 1, "{:?}", read.errors);
    assert!(
        read.errors[0].to_string().contains("PrefixListId"),
        "{:?}",
        read.errors
    );
}
