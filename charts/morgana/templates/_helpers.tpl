{{/* Names, labels, images and credential references shared by every template. */}}

{{- define "morgana.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* `<release>-<chart>`, or just the release name when it already contains the chart name. */}}
{{- define "morgana.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* `<fullname>-<component>`: (dict "ctx" $ "component" "api") */}}
{{- define "morgana.componentName" -}}
{{- printf "%s-%s" (include "morgana.fullname" .ctx | trunc 50 | trimSuffix "-") .component }}
{{- end }}

{{- define "morgana.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "morgana.selectorLabels" -}}
app.kubernetes.io/name: {{ include "morgana.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "morgana.labels" -}}
helm.sh/chart: {{ include "morgana.chart" . }}
{{ include "morgana.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: morgana
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* (dict "ctx" $ "component" "api") */}}
{{- define "morgana.componentSelectorLabels" -}}
{{ include "morgana.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "morgana.componentLabels" -}}
{{ include "morgana.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* metadata.annotations from commonAnnotations plus extras: (dict "ctx" $ "extra" (dict ...)) */}}
{{- define "morgana.annotations" -}}
{{- $all := merge (deepCopy (default (dict) .extra)) (deepCopy .ctx.Values.commonAnnotations) }}
{{- with $all }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* `<registry>/<repository>:<tag>`: (dict "ctx" $ "image" .Values.api.image) */}}
{{- define "morgana.image" -}}
{{- $registry := .ctx.Values.image.registry }}
{{- $tag := .image.tag | default .ctx.Values.image.tag | default .ctx.Chart.AppVersion }}
{{- if $registry }}
{{- printf "%s/%s:%s" $registry .image.repository $tag }}
{{- else }}
{{- printf "%s:%s" .image.repository $tag }}
{{- end }}
{{- end }}

{{- define "morgana.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* ServiceAccount name of a component: (dict "ctx" $ "component" "api") */}}
{{- define "morgana.serviceAccountName" -}}
{{- $sa := (index .ctx.Values .component).serviceAccount }}
{{- if $sa.create }}
{{- default (include "morgana.componentName" .) $sa.name }}
{{- else }}
{{- default "default" $sa.name }}
{{- end }}
{{- end }}

{{/*
Credentials. Each group (postgres, redis, livekit, llm, auth, agentUser) reads its values from
`existingSecret` when set, else from the chart's own Secret (`<fullname>`). The migration Job
runs before that Secret exists (pre-install hook), so it reads a hook-time copy instead:
`<fullname>-hook`, deleted once the hook succeeds.
*/}}
{{- define "morgana.secretName" -}}
{{- include "morgana.fullname" . }}
{{- end }}

{{/*
(dict "ctx" $ "group" "postgres" "hook" false) -> the Secret holding that group's keys. The
LiveKit keys have a Secret of their own, `<fullname>-livekit`: the controller reads them, and
may read nothing else.
*/}}
{{- define "morgana.groupSecretName" -}}
{{- $group := index .ctx.Values .group }}
{{- if $group.existingSecret }}
{{- $group.existingSecret }}
{{- else if .hook }}
{{- printf "%s-hook" (include "morgana.secretName" .ctx) }}
{{- else if eq .group "livekit" }}
{{- printf "%s-livekit" (include "morgana.secretName" .ctx) }}
{{- else }}
{{- include "morgana.secretName" .ctx }}
{{- end }}
{{- end }}

{{/* One env entry from a credential: (dict "ctx" $ "group" "postgres" "key" "password" "env" "POSTGRES_PASSWORD" "hook" false) */}}
{{- define "morgana.secretEnv" -}}
- name: {{ .env }}
  valueFrom:
    secretKeyRef:
      name: {{ include "morgana.groupSecretName" . }}
      key: {{ index (index .ctx.Values .group).secretKeys .key }}
{{- end }}

{{/* Whether a credential group has a value to use: its existingSecret or a non-empty plain value. */}}
{{- define "morgana.hasCredential" -}}
{{- $group := index .ctx.Values .group }}
{{- if or $group.existingSecret (index $group .field) }}true{{ end }}
{{- end }}

{{/*
Whether the voice agent's API account is configured: always with the agent workers, and without
them when a password is given (for workers run elsewhere). Only then do the migration Job (which
creates the account) and the workers get API_USER_EMAIL and API_USER_PASSWORD.
*/}}
{{- define "morgana.agentUserEnabled" -}}
{{- $v := .Values }}
{{- if or $v.agent.enabled $v.agentUser.existingSecret $v.agentUser.password }}true{{ end }}
{{- end }}

{{/* Data of the chart-managed Secret: only groups without an existingSecret. Keys match secretKeys. */}}
{{- define "morgana.secretData" -}}
{{- $v := .Values }}
{{- if not $v.postgres.existingSecret }}
{{ $v.postgres.secretKeys.password | default "password" }}: {{ $v.postgres.password | b64enc | quote }}
{{- end }}
{{- if and $v.redis.enabled (not $v.redis.existingSecret) $v.redis.password }}
{{ $v.redis.secretKeys.password }}: {{ $v.redis.password | b64enc | quote }}
{{- end }}
{{- if and (not $v.llm.existingSecret) $v.llm.apiKey }}
{{ $v.llm.secretKeys.apiKey }}: {{ $v.llm.apiKey | b64enc | quote }}
{{- end }}
{{- if not $v.auth.existingSecret }}
{{ $v.auth.secretKeys.jwtSecret }}: {{ $v.auth.jwtSecret | b64enc | quote }}
{{- end }}
{{- if and (include "morgana.agentUserEnabled" .) (not $v.agentUser.existingSecret) }}
{{ $v.agentUser.secretKeys.password }}: {{ $v.agentUser.password | b64enc | quote }}
{{- end }}
{{- end }}

{{/* Data of the chart-managed LiveKit Secret (`<fullname>-livekit`), when there is no existingSecret. */}}
{{- define "morgana.livekitSecretData" -}}
{{- $v := .Values }}
{{- if not $v.livekit.existingSecret }}
{{ $v.livekit.secretKeys.apiKey }}: {{ $v.livekit.apiKey | b64enc | quote }}
{{ $v.livekit.secretKeys.apiSecret }}: {{ $v.livekit.apiSecret | b64enc | quote }}
{{- end }}
{{- end }}

{{/* Every chart-managed credential, for the pods' checksum annotation: they roll when one changes. */}}
{{- define "morgana.credentialsChecksum" -}}
{{- printf "%s\n%s" (include "morgana.secretData" .) (include "morgana.livekitSecretData" .) | sha256sum }}
{{- end }}

{{/* Whether the chart must create its own Secret at all (besides the LiveKit one). */}}
{{- define "morgana.needsSecret" -}}
{{- $v := .Values }}
{{- if or (not $v.postgres.existingSecret) (and $v.redis.enabled (not $v.redis.existingSecret) $v.redis.password) (and (not $v.llm.existingSecret) $v.llm.apiKey) (not $v.auth.existingSecret) (and (include "morgana.agentUserEnabled" .) (not $v.agentUser.existingSecret)) }}true{{ end }}
{{- end }}

{{/*
Plain (non-secret) settings, as `KEY: "value"` lines: the data of a component's ConfigMap, and
the inline env of the migration Job (a pre-install hook runs before the ConfigMap exists).
*/}}
{{- define "morgana.commonConfig" -}}
ENVIRONMENT: {{ .Values.environment | quote }}
LOG_LEVEL: {{ .Values.logLevel | quote }}
LOG_FORMAT: {{ .Values.logFormat | quote }}
LIVEKIT_URL: {{ .Values.livekit.url | quote }}
LIVEKIT_AGENT_NAME: {{ .Values.livekit.agentName | quote }}
{{- with .Values.llm.baseUrl }}
OPENAI_BASE_URL: {{ . | quote }}
{{- end }}
{{- end }}

{{- define "morgana.apiConfig" -}}
{{- $v := .Values -}}
{{ include "morgana.commonConfig" . }}
OTEL_EXPORTER_OTLP_ENDPOINT: {{ .Values.otelExporterOtlpEndpoint | quote }}
OTEL_SERVICE_NAME: "morgana-api"
POSTGRES_HOST: {{ $v.postgres.host | quote }}
POSTGRES_PORT: {{ $v.postgres.port | quote }}
POSTGRES_DB: {{ $v.postgres.database | quote }}
{{- if not (and $v.postgres.existingSecret $v.postgres.secretKeys.username) }}
POSTGRES_USER: {{ $v.postgres.user | quote }}
{{- end }}
DB_POOL_SIZE: {{ $v.postgres.poolSize | quote }}
DB_MAX_OVERFLOW: {{ $v.postgres.maxOverflow | quote }}
LLM_MODEL: {{ $v.llm.model | quote }}
LLM_TEMPERATURE: {{ $v.llm.temperature | quote }}
LLM_TIMEOUT_SECONDS: {{ $v.llm.timeoutSeconds | quote }}
{{- with $v.livekit.publicUrl }}
LIVEKIT_PUBLIC_URL: {{ . | quote }}
{{- end }}
PORT: "8000"
API_METRICS_PORT: "9101"
DOCS_ENABLED: {{ $v.api.docs.enabled | quote }}
PLAYGROUND_ENABLED: {{ $v.api.playground.enabled | quote }}
WEB_CONCURRENCY: {{ $v.api.workers | quote }}
{{- /* Open chat streams finish inside the pod's grace period. */}}
GUNICORN_GRACEFUL_TIMEOUT: {{ sub $v.api.terminationGracePeriodSeconds 10 | max 1 | quote }}
CORS_ORIGINS: {{ join "," $v.api.corsOrigins | quote }}
FORWARDED_ALLOW_IPS: {{ $v.api.forwardedAllowIps | quote }}
CHAT_STREAM_RESUME_SECONDS: {{ $v.api.chatStreams.resumeSeconds | quote }}
CHAT_STREAM_ON_DISCONNECT: {{ $v.api.chatStreams.onDisconnect | quote }}
RATE_LIMIT_ENABLED: {{ $v.api.rateLimits.enabled | quote }}
RATE_LIMIT_REGISTER: {{ $v.api.rateLimits.register | quote }}
RATE_LIMIT_LOGIN: {{ $v.api.rateLimits.login | quote }}
RATE_LIMIT_LOGIN_ACCOUNT: {{ $v.api.rateLimits.loginAccount | quote }}
PASSWORD_HASH_CONCURRENCY: {{ $v.api.passwordHash.concurrency | quote }}
PASSWORD_HASH_QUEUE: {{ $v.api.passwordHash.queue | quote }}
RATE_LIMIT_SESSION: {{ $v.api.rateLimits.session | quote }}
RATE_LIMIT_CHAT: {{ $v.api.rateLimits.chat | quote }}
RATE_LIMIT_MESSAGES: {{ $v.api.rateLimits.messages | quote }}
RATE_LIMIT_LIVEKIT: {{ $v.api.rateLimits.livekit | quote }}
{{- /* Callers left alone get the agent again: from the controller when it does that, else the API. */}}
{{- $a := $v.controller.autoscaler }}
{{- if and $v.controller.enabled $a.enabled $v.agent.enabled $a.redispatch.enabled }}
LIVEKIT_REDISPATCH_SECONDS: "0"
{{- end }}
{{- end }}

{{- define "morgana.agentConfig" -}}
{{- $v := .Values -}}
{{ include "morgana.commonConfig" . }}
API_USER_EMAIL: {{ $v.agentUser.email | quote }}
MORGANA_BACKEND_URL: {{ $v.agent.backendUrl | default (printf "http://%s:%v" (include "morgana.componentName" (dict "ctx" . "component" "api")) $v.api.service.port) | quote }}
{{- with $v.agent.speech.baseUrl }}
STT_BASE_URL: {{ . | quote }}
TTS_BASE_URL: {{ . | quote }}
{{- end }}
STT_MODEL: {{ $v.agent.speech.sttModel | quote }}
STT_LANGUAGE: {{ $v.agent.speech.sttLanguage | quote }}
TTS_MODEL: {{ $v.agent.speech.ttsModel | quote }}
TTS_VOICE: {{ $v.agent.speech.ttsVoice | quote }}
MAX_CONCURRENT_CALLS: {{ $v.agent.maxConcurrentCalls | quote }}
DRAIN_TIMEOUT_SECONDS: {{ $v.agent.drainTimeoutSeconds | quote }}
HEALTH_PORT: "8081"
METRICS_PORT: "9100"
{{- end }}

{{/* A config mapping (from the helpers above) as env entries, for the hook Job. */}}
{{- define "morgana.configAsEnv" -}}
{{- range $name, $value := fromYaml . }}
- name: {{ $name }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- end }}

{{/*
The API's credentials (the API and its Job share them): env entries from Secrets.
(dict "ctx" $ "hook" false)
*/}}
{{- define "morgana.apiSecretEnv" -}}
{{- $v := .ctx.Values -}}
{{- if and $v.postgres.existingSecret $v.postgres.secretKeys.username }}
{{ include "morgana.secretEnv" (dict "ctx" .ctx "group" "postgres" "key" "username" "env" "POSTGRES_USER" "hook" .hook) }}
{{- end }}
{{ include "morgana.secretEnv" (dict "ctx" .ctx "group" "postgres" "key" "password" "env" "POSTGRES_PASSWORD" "hook" .hook) }}
{{- if $v.redis.enabled }}
{{- $scheme := ternary "rediss" "redis" $v.redis.tls }}
{{- if or $v.redis.existingSecret $v.redis.password }}
{{ include "morgana.secretEnv" (dict "ctx" .ctx "group" "redis" "key" "password" "env" "REDIS_PASSWORD" "hook" .hook) }}
{{- /* Kubernetes expands $(REDIS_PASSWORD) from the entry above (only in env, not envFrom). */}}
- name: REDIS_URL
  value: {{ printf "%s://:$(REDIS_PASSWORD)@%s:%v/%v" $scheme $v.redis.host $v.redis.port $v.redis.database | quote }}
{{- else }}
- name: REDIS_URL
  value: {{ printf "%s://%s:%v/%v" $scheme $v.redis.host $v.redis.port $v.redis.database | quote }}
{{- end }}
{{- end }}
{{ include "morgana.secretEnv" (dict "ctx" .ctx "group" "auth" "key" "jwtSecret" "env" "JWT_SECRET_KEY" "hook" .hook) }}
{{- if include "morgana.hasCredential" (dict "ctx" .ctx "group" "llm" "field" "apiKey") }}
{{ include "morgana.secretEnv" (dict "ctx" .ctx "group" "llm" "key" "apiKey" "env" "OPENAI_API_KEY" "hook" .hook) }}
{{- end }}
{{ include "morgana.secretEnv" (dict "ctx" .ctx "group" "livekit" "key" "apiKey" "env" "LIVEKIT_API_KEY" "hook" .hook) }}
{{ include "morgana.secretEnv" (dict "ctx" .ctx "group" "livekit" "key" "apiSecret" "env" "LIVEKIT_API_SECRET" "hook" .hook) }}
{{- end }}

{{/*
The voice agent's account, for the migration Job that creates it (the API itself never needs it).
(dict "ctx" $ "hook" true)
*/}}
{{- define "morgana.agentUserEnv" -}}
{{- if include "morgana.agentUserEnabled" .ctx }}
- name: API_USER_EMAIL
  value: {{ .ctx.Values.agentUser.email | quote }}
{{ include "morgana.secretEnv" (dict "ctx" .ctx "group" "agentUser" "key" "password" "env" "API_USER_PASSWORD" "hook" .hook) }}
{{- end }}
{{- end }}

{{/* Pod-level scheduling keys of a component values block. */}}
{{- define "morgana.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Fail early with a clear message on values that would deploy a broken release. */}}
{{- define "morgana.validate" -}}
{{- $v := .Values }}
{{- if and $v.agent.enabled (le (int $v.agent.terminationGracePeriodSeconds) (int $v.agent.drainTimeoutSeconds)) }}
{{- fail "agent.terminationGracePeriodSeconds must exceed agent.drainTimeoutSeconds, or Kubernetes kills workers with calls still running" }}
{{- end }}
{{- if and (not $v.auth.existingSecret) (not $v.auth.jwtSecret) }}
{{- fail "set auth.jwtSecret (openssl rand -hex 32) or auth.existingSecret" }}
{{- end }}
{{- if and (not $v.livekit.existingSecret) (or (not $v.livekit.apiKey) (not $v.livekit.apiSecret)) }}
{{- fail "set livekit.apiKey and livekit.apiSecret, or livekit.existingSecret" }}
{{- end }}
{{- if and (not $v.postgres.existingSecret) (not $v.postgres.password) }}
{{- fail "set postgres.password or postgres.existingSecret" }}
{{- end }}
{{- if and $v.agent.enabled (not $v.agentUser.existingSecret) (not $v.agentUser.password) }}
{{- fail "set agentUser.password or agentUser.existingSecret: the voice agent logs in to the API with it" }}
{{- end }}
{{- if and (ne $v.environment "development") (not $v.llm.existingSecret) (not $v.llm.apiKey) }}
{{- fail "set llm.apiKey or llm.existingSecret (for a keyless OpenAI-compatible server, any value), or environment=development" }}
{{- end }}
{{- if and $v.controller.autoscaler.enabled (not $v.controller.enabled) }}
{{- fail "controller.autoscaler.enabled needs controller.enabled" }}
{{- end }}
{{- end }}
