"""The autoscaling controller: scales voice agent worker Deployments from LiveKit room load.

A kopf operator serving `AgentAutoscaler` resources (morgana.dev/v1alpha1, CRD in
charts/morgana/crds/): every `pollIntervalSeconds` it reads the rooms of a LiveKit server,
asks `policy` for the replicas they need, patches the target Deployment's scale
subresource, posts an Event for every scaling decision, re-dispatches agents to rooms left
without one, and writes the resource's status. `morgana-controller` runs it (see `cli`).

RBAC (least privilege)
----------------------
Namespaced mode (WATCH_NAMESPACE=ns1,ns2; the chart's default is its release namespace): a
Role with these rules in every watched namespace, bound to the controller's ServiceAccount.
Nothing cluster-scoped is needed: kopf's CRD and Namespace scanning is off, and API
discovery is open to every authenticated client (system:discovery).

.. code-block:: yaml
   :name: namespaced-rules

    # kopf lists and watches the resources, and patches its finalizer on and off them (reading
    # the server's copy first when it takes it off on exit)
    - apiGroups: [morgana.dev]
      resources: [agentautoscalers]
      verbs: [get, list, watch, patch]
    # the status the controller writes
    - apiGroups: [morgana.dev]
      resources: [agentautoscalers/status]
      verbs: [patch]
    # the target's replicas and ready replicas (capacity for re-dispatch)
    - apiGroups: [apps]
      resources: [deployments]
      verbs: [get]
    # scaling goes through the scale subresource only: no write access to Deployments
    - apiGroups: [apps]
      resources: [deployments/scale]
      verbs: [patch]
    # the LiveKit credentials (the chart may narrow this with resourceNames: [<its Secret>])
    - apiGroups: [""]
      resources: [secrets]
      verbs: [get]
    # an Event for every scaling decision, re-dispatch and condition change
    - apiGroups: [""]
      resources: [events]
      verbs: [create]
    # kopf peering: one active replica, through a peering object that must exist (see below)
    - apiGroups: [kopf.dev]
      resources: [kopfpeerings]
      verbs: [list, watch, patch]

Cluster-wide mode (WATCH_NAMESPACE empty): the same rules in a ClusterRole bound with a
ClusterRoleBinding, except that peering uses the cluster-scoped ClusterKopfPeering:

.. code-block:: yaml
   :name: clusterwide-rules

    - apiGroups: [morgana.dev]
      resources: [agentautoscalers]
      verbs: [get, list, watch, patch]
    - apiGroups: [morgana.dev]
      resources: [agentautoscalers/status]
      verbs: [patch]
    - apiGroups: [apps]
      resources: [deployments]
      verbs: [get]
    - apiGroups: [apps]
      resources: [deployments/scale]
      verbs: [patch]
    - apiGroups: [""]
      resources: [secrets]
      verbs: [get]
    - apiGroups: [""]
      resources: [events]
      verbs: [create]
    - apiGroups: [kopf.dev]
      resources: [clusterkopfpeerings]
      verbs: [list, watch, patch]

The peering object (a KopfPeering named PEERING_NAME in each watched namespace, or a
ClusterKopfPeering) must exist: the chart creates it, so that `helm uninstall` deletes it.
Without the chart, create it yourself, or add `create` to the peering rule and the controller
creates it on its first start.

Stopping for good (`morgana-controller stop`, the chart's pre-delete hook) runs with its own
ServiceAccount: `get` and `deployments/scale` `patch` on the controller's Deployment, `list`
on pods, and `get`, `list` and `patch` on agentautoscalers.
"""
