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

    # kopf lists and watches the resources, and patches its finalizer on and off them
    - apiGroups: [morgana.dev]
      resources: [agentautoscalers]
      verbs: [list, watch, patch]
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
    # kopf peering: one active replica; `create` makes the peering object on first start
    - apiGroups: [kopf.dev]
      resources: [kopfpeerings]
      verbs: [list, watch, patch, create]

Cluster-wide mode (WATCH_NAMESPACE empty): the same rules in a ClusterRole bound with a
ClusterRoleBinding, except that peering uses the cluster-scoped ClusterKopfPeering:

.. code-block:: yaml
   :name: clusterwide-rules

    - apiGroups: [morgana.dev]
      resources: [agentautoscalers]
      verbs: [list, watch, patch]
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
      verbs: [list, watch, patch, create]

If the chart creates the peering object itself (a KopfPeering named PEERING_NAME in each
watched namespace, or a ClusterKopfPeering), `create` can be dropped from the peering rule.
"""
