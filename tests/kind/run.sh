#!/usr/bin/env bash
# kind integration test: a cluster without kube-proxy, kplb as its DaemonSet, and checks of
# ClusterIP, NodePort and externalTrafficPolicy: Local source-IP preservation.
# Needs docker and kind; exits 0 with "SKIPPED" where they are missing.
set -euo pipefail
cd "$(dirname "$0")/../.."
for tool in docker kind kubectl; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "SKIPPED (kind): '$tool' not found; this test needs docker, kind and kubectl"
    exit 0
  fi
done
if ! docker info >/dev/null 2>&1; then
  echo "SKIPPED (kind): no docker engine reachable"
  exit 0
fi

CLUSTER=${KPLB_KIND_CLUSTER:-kplb-test}
IMAGE=kplb/lb-agent:dev
cleanup() { kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true; }
trap cleanup EXIT

docker build -f manifests/Dockerfile -t "$IMAGE" .
kind create cluster --name "$CLUSTER" --config manifests/kind-config.yaml --wait 120s
kind load docker-image "$IMAGE" --name "$CLUSTER"
kubectl apply -k manifests/
# The agent cannot use the kubernetes ClusterIP before it has programmed it: point it at the
# control plane node directly.
api_host=$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$CLUSTER-control-plane")
kubectl -n kube-system set env ds/kplb KUBERNETES_SERVICE_HOST="$api_host" KUBERNETES_SERVICE_PORT=6443
kubectl -n kube-system rollout status daemonset/kplb --timeout=180s

kubectl apply -f tests/kind/workload.yaml
kubectl rollout status deployment/netexec --timeout=180s
kubectl wait --for=condition=Ready pod/client --timeout=120s

# ClusterIP from a pod.
for _ in $(seq 1 30); do
  if kubectl exec client -- wget -qO- -T 2 http://netexec.default.svc/hostname; then break; fi
  sleep 2
done
hosts=$(for _ in $(seq 1 30); do kubectl exec client -- wget -qO- -T 2 http://netexec.default.svc/hostname; echo; done | sort -u | grep -c .)
[ "$hosts" -ge 2 ] || { echo "FAIL: ClusterIP reached $hosts backend(s), want >= 2"; exit 1; }
echo "ok: ClusterIP reaches $hosts backends"

# NodePort from outside the cluster (the docker host), on every node.
for node in $(kubectl get nodes -o jsonpath='{.items[*].status.addresses[?(@.type=="InternalIP")].address}'); do
  curl -sf --max-time 3 "http://$node:30080/hostname" >/dev/null || { echo "FAIL: NodePort on $node"; exit 1; }
done
echo "ok: NodePort answers on every node"

# externalTrafficPolicy: Local keeps the client's address.
node=$(kubectl get pod -l app=netexec -o jsonpath='{.items[0].status.hostIP}')
seen=$(curl -sf --max-time 3 "http://$node:30081/clientip")
case "$seen" in
  172.*|192.168.*|10.*) echo "ok: Local policy, backend saw $seen" ;;
  *) echo "FAIL: unexpected client address $seen"; exit 1 ;;
esac
echo "kind test passed"
