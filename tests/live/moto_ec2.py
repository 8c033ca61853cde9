"""moto's EC2 for the live-source tests (no AWS can be had here).

Serves EC2 on 127.0.0.1:PORT (argv[1]) for region argv[2], then answers JSON lines on
stdin with one JSON line each on stdout:
  {"call": NAME, "args": {...}}        boto3's ec2 client call against the server
  {"next_ids": {"sg": [...], "eni": [...], "pl": [...]}}
                                       the IDs the next created objects get (moto
                                       draws random ones; state files name theirs)
  {"interface_type": [ENI_ID, TYPE]}   what moto ignores on create: the VPC resource
                                       controller's trunk and branch ENIs
  {"seed": DIR}                        a state directory's EC2 files, recreated
  {"actions": ACCESS_KEY}              the EC2 actions of the requests signed with
                                       ACCESS_KEY so far, each once, sorted (moto's
                                       recorder logs every request)
  {"requests": ACCESS_KEY}             how many requests signed with ACCESS_KEY so
                                       far, by action
Answers are {"ok": RESPONSE} or {"error": TEXT}.
"""

import base64
import ipaddress
import json
import logging
import os
import sys
import tempfile
import urllib.parse

# moto's recorder reads these when it is imported: every request is logged, so a test
# can check which actions a client used.
RECORDING = os.path.join(tempfile.mkdtemp(prefix="moto-recording-"), "requests.jsonl")
os.environ["MOTO_RECORDER_FILEPATH"] = RECORDING
os.environ["MOTO_ENABLE_RECORDING"] = "true"

import boto3  # noqa: E402 (after the recorder's settings)
from moto.core import DEFAULT_ACCOUNT_ID  # noqa: E402
from moto.ec2.models import ec2_backends  # noqa: E402
from moto.ec2.models import elastic_network_interfaces as enis_module  # noqa: E402
from moto.ec2.models import managed_prefixes as prefixes_module  # noqa: E402
from moto.ec2.models import security_groups as groups_module  # noqa: E402
from moto.server import ThreadedMotoServer  # noqa: E402

PORT = int(sys.argv[1])
REGION = sys.argv[2]
TRUNK_TAG = "vpcresources.k8s.aws/trunk-eni-id"

# IDs asked for by the test, taken before moto's random ones.
next_ids = {"sg": [], "eni": [], "pl": []}


def take(kind, fallback):
    def draw(*args, **kwargs):
        if next_ids[kind]:
            return next_ids[kind].pop(0)
        return fallback(*args, **kwargs)

    return draw


groups_module.random_security_group_id = take("sg", groups_module.random_security_group_id)
enis_module.random_eni_id = take("eni", enis_module.random_eni_id)
prefixes_module.random_managed_prefix_list_id = take(
    "pl", prefixes_module.random_managed_prefix_list_id
)

# The `interface-type` filter, over the attribute `interface_type` commands set.
_filter_value = enis_module.NetworkInterface.get_filter_value


def _interface_filter(self, name, method_name=None):
    if name == "interface-type":
        return self.interface_type
    return _filter_value(self, name, method_name)


enis_module.NetworkInterface.get_filter_value = _interface_filter

# One line per request on stderr would drown the tests' output.
logging.getLogger("werkzeug").setLevel(logging.ERROR)
server = ThreadedMotoServer(ip_address="127.0.0.1", port=PORT, verbose=False)
server.start()
client = boto3.client(
    "ec2",
    region_name=REGION,
    endpoint_url=f"http://127.0.0.1:{PORT}",
    aws_access_key_id="testing",
    aws_secret_access_key="testing",
)


def backend():
    return ec2_backends[DEFAULT_ACCOUNT_ID][REGION]


def clean_permissions(permissions):
    """CLI output as boto3 input: only the fields authorize takes."""
    cleaned = []
    for p in permissions:
        out = {"IpProtocol": p["IpProtocol"]}
        for key in ("FromPort", "ToPort"):
            if key in p:
                out[key] = p[key]
            elif p["IpProtocol"] != "-1":
                # moto needs ports for every protocol but -1 (EC2 prints none for, e.g.,
                # ESP); -1 reads the same to the enforcer: any.
                out[key] = -1
        for key in ("IpRanges", "Ipv6Ranges", "PrefixListIds"):
            if p.get(key):
                out[key] = p[key]
        if p.get("UserIdGroupPairs"):
            out["UserIdGroupPairs"] = [
                {k: v for k, v in pair.items() if k in ("GroupId", "Description")}
                for pair in p["UserIdGroupPairs"]
            ]
        cleaned.append(out)
    return cleaned


def seed(directory):
    """The EC2 objects of a state directory, with their IDs, in a fresh VPC."""
    vpc = client.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    subnets = {}

    def subnet_for(address):
        net = ipaddress.ip_network(f"{address}/24", strict=False)
        if net not in subnets:
            subnets[net] = client.create_subnet(VpcId=vpc, CidrBlock=str(net))["Subnet"]["SubnetId"]
        return subnets[net]

    created = {"groups": [], "interfaces": [], "prefixLists": []}
    files = sorted(os.listdir(directory))
    documents = []
    for name in files:
        if name.endswith(".json"):
            with open(os.path.join(directory, name)) as f:
                documents.append(json.load(f))
    for doc in documents:
        if "PrefixListId" in doc and "Entries" in doc:
            next_ids["pl"].append(doc["PrefixListId"])
            family = "IPv6" if ":" in doc["Entries"][0]["Cidr"] else "IPv4"
            client.create_managed_prefix_list(
                PrefixListName=doc.get("PrefixListName", doc["PrefixListId"]),
                Entries=[{k: v for k, v in e.items() if k in ("Cidr", "Description")} for e in doc["Entries"]],
                MaxEntries=max(10, len(doc["Entries"])),
                AddressFamily=family,
            )
            created["prefixLists"].append(doc["PrefixListId"])
    groups = [g for doc in documents for g in doc.get("SecurityGroups", [])]
    for g in groups:
        next_ids["sg"].append(g["GroupId"])
        client.create_security_group(GroupName=g["GroupName"], Description=g.get("Description") or g["GroupName"], VpcId=vpc)
        created["groups"].append(g["GroupId"])
    for g in groups:
        # moto, like EC2, gives a new group an allow-all egress rule the file may not have.
        default = backend().get_security_group_by_name_or_id(g["GroupId"], vpc)
        if default.egress_rules:
            client.revoke_security_group_egress(
                GroupId=g["GroupId"],
                IpPermissions=[{"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}],
            )
        if g.get("IpPermissions"):
            client.authorize_security_group_ingress(GroupId=g["GroupId"], IpPermissions=clean_permissions(g["IpPermissions"]))
        if g.get("IpPermissionsEgress"):
            client.authorize_security_group_egress(GroupId=g["GroupId"], IpPermissions=clean_permissions(g["IpPermissionsEgress"]))
    for doc in documents:
        for eni in doc.get("NetworkInterfaces", []):
            next_ids["eni"].append(eni["NetworkInterfaceId"])
            args = {
                "SubnetId": subnet_for(eni["PrivateIpAddress"]),
                "Groups": [g["GroupId"] for g in eni.get("Groups", [])],
                "Description": eni.get("Description", ""),
                "PrivateIpAddresses": [
                    {"PrivateIpAddress": a["PrivateIpAddress"], "Primary": a.get("Primary", False)}
                    for a in eni.get("PrivateIpAddresses", [])
                ] or [{"PrivateIpAddress": eni["PrivateIpAddress"], "Primary": True}],
            }
            if eni.get("Ipv6Addresses"):
                args["Ipv6Addresses"] = [{"Ipv6Address": a["Ipv6Address"]} for a in eni["Ipv6Addresses"]]
            created_eni = client.create_network_interface(**args)["NetworkInterface"]
            if eni.get("PrivateDnsName"):
                backend().enis[created_eni["NetworkInterfaceId"]].private_dns_name = eni["PrivateDnsName"]
            created["interfaces"].append(created_eni["NetworkInterfaceId"])
    created["vpc"] = vpc
    created["subnets"] = {str(k): v for k, v in subnets.items()}
    return created


def signed_actions(access_key):
    """The action of each recorded request signed with `access_key`, in order."""
    if not os.path.exists(RECORDING):
        return
    with open(RECORDING) as log:
        for line in log:
            entry = json.loads(line)
            if f"Credential={access_key}/" not in entry["headers"].get("Authorization", ""):
                continue
            body = entry.get("body") or ""
            if entry.get("body_encoded"):
                body = base64.b64decode(body).decode()
            query = urllib.parse.urlsplit(entry["url"]).query
            for text in (body, query):
                yield from urllib.parse.parse_qs(text).get("Action", [])


def actions(access_key):
    """The actions of the recorded requests signed with `access_key`."""
    return sorted(set(signed_actions(access_key)))


def requests(access_key):
    """How many recorded requests signed with `access_key`, by action."""
    counts = {}
    for action in signed_actions(access_key):
        counts[action] = counts.get(action, 0) + 1
    return counts


print(json.dumps({"ready": PORT}), flush=True)
for line in sys.stdin:
    request = json.loads(line)
    try:
        if "call" in request:
            response = getattr(client, request["call"])(**request.get("args", {}))
            response.pop("ResponseMetadata", None)
        elif "next_ids" in request:
            for kind, ids in request["next_ids"].items():
                next_ids[kind].extend(ids)
            response = {}
        elif "interface_type" in request:
            eni_id, kind = request["interface_type"]
            backend().enis[eni_id].interface_type = kind
            response = {}
        elif "seed" in request:
            response = seed(request["seed"])
        elif "actions" in request:
            response = actions(request["actions"])
        elif "requests" in request:
            response = requests(request["requests"])
        else:
            raise ValueError(f"unknown request {request}")
        print(json.dumps({"ok": response}, default=str), flush=True)
    except Exception as error:  # the test reads the error; the server stays up
        print(json.dumps({"error": f"{type(error).__name__}: {error}"}), flush=True)
