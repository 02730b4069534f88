{{/* Names and labels. */}}
{{- define "jetpool.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "jetpool.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "jetpool.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "jetpool.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: jetpool
{{- end -}}

{{/* Labels of one service's objects and pods. Call with (dict "root" $ "name" SERVICE). */}}
{{- define "jetpool.serviceLabels" -}}
{{ include "jetpool.labels" .root }}
app.kubernetes.io/component: {{ .name }}
{{- end -}}

{{/* Selector labels of one service's pods. Call with (dict "root" $ "name" SERVICE). */}}
{{- define "jetpool.selectorLabels" -}}
app.kubernetes.io/name: {{ include "jetpool.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .name }}
{{- end -}}

{{- define "jetpool.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "jetpool.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "jetpool.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/*
Deep merge: keys of .over win over keys of .base, maps are merged key by key. Unlike sprig's
mergeOverwrite, a false, 0 or "" in .over does override (services.x.enabled: false must work).
Returns YAML; read it back with fromYaml.
*/}}
{{- define "jetpool.merge" -}}
{{- $out := deepCopy (.base | default dict) -}}
{{- range $key, $value := (.over | default dict) -}}
{{- $base := get $out $key -}}
{{- if and (kindIs "map" $value) (kindIs "map" $base) -}}
{{- $_ := set $out $key (include "jetpool.merge" (dict "base" $base "over" $value) | fromYaml) -}}
{{- else -}}
{{- $_ := set $out $key $value -}}
{{- end -}}
{{- end -}}
{{- toYaml $out -}}
{{- end -}}

{{/* One service's values: serviceDefaults with services.NAME merged over them. (dict "root" $ "name" NAME) */}}
{{- define "jetpool.serviceValues" -}}
{{- include "jetpool.merge" (dict "base" .root.Values.serviceDefaults "over" (get .root.Values.services .name)) -}}
{{- end -}}

{{/*
The config file every pod reads: .Values.config, with each service's `config` overrides merged into
config.services.NAME. Rendered generically, so config keys the chart does not know pass through.
*/}}
{{- define "jetpool.config" -}}
{{- $config := deepCopy .Values.config -}}
{{- $services := deepCopy ($config.services | default dict) -}}
{{- range $name, $_ := .Values.services -}}
{{- $svc := include "jetpool.serviceValues" (dict "root" $ "name" $name) | fromYaml -}}
{{- if $svc.config -}}
{{- $_ := set $services $name (include "jetpool.merge" (dict "base" (get $services $name) "over" $svc.config) | fromYaml) -}}
{{- end -}}
{{- end -}}
{{- $_ := set $config "services" $services -}}
{{- toYaml $config -}}
{{- end -}}

{{/*
Every enabled service, merged and with what the templates derive from it:
  fullname      name of its Deployment, Service, PDB and ScaledObject
  stream        the stream its consumer reads (config.services.NAME.stream)
  consumer      its durable consumer's name (config durable, default: the service name)
  configReplicas  the pod count the engine sizes max_ack_pending for (maxReplicas under KEDA)
  terminationGracePeriodSeconds  ceil(drain_timeout_s) + 5 + shutdownMarginSeconds
Returns YAML: {NAME: {...}}.
*/}}
{{- define "jetpool.services" -}}
{{- $root := . -}}
{{- $config := include "jetpool.config" . | fromYaml -}}
{{- $out := dict -}}
{{- range $name, $_ := .Values.services -}}
{{- $svc := include "jetpool.serviceValues" (dict "root" $root "name" $name) | fromYaml -}}
{{- if $svc.enabled -}}
{{- $cfg := get ($config.services | default dict) $name -}}
{{- if not (and (kindIs "map" $cfg) $cfg.stream) -}}
{{- fail (printf "services.%s: config.services.%s needs at least its stream and routes (set them there or in services.%s.config)" $name $name $name) -}}
{{- end -}}
{{- $drain := $cfg.drain_timeout_s | default 20 -}}
{{- $_ := set $svc "fullname" (printf "%s-%s" (include "jetpool.fullname" $root) $name | trunc 63 | trimSuffix "-") -}}
{{- $_ := set $svc "stream" $cfg.stream -}}
{{- $_ := set $svc "consumer" ($cfg.durable | default $name) -}}
{{- $_ := set $svc "configReplicas" (ternary $svc.autoscaling.maxReplicas $svc.replicas $svc.autoscaling.enabled) -}}
{{- $_ := set $svc "terminationGracePeriodSeconds" (add (ceil $drain) 5 $root.Values.shutdownMarginSeconds) -}}
{{- $_ := set $out $name $svc -}}
{{- end -}}
{{- end -}}
{{- toYaml $out -}}
{{- end -}}

{{/*
Where a pod's NATS credentials come from: a Secret name and the key of each credential in it
(empty: not used). A service's own natsAuth.existingSecret wins over nats.auth; inline credentials
live in the Secret the chart creates. (dict "root" $ "svc" SERVICE) -> YAML.
*/}}
{{- define "jetpool.natsAuth" -}}
{{- $auth := .root.Values.nats.auth -}}
{{- $inline := or $auth.user $auth.password $auth.token -}}
{{- if and $inline $auth.existingSecret -}}
{{- fail "nats.auth: give either existingSecret or inline credentials (user/password/token), not both" -}}
{{- end -}}
{{- if .svc.natsAuth.existingSecret -}}
{{- toYaml (dict "secret" .svc.natsAuth.existingSecret "user" .svc.natsAuth.userKey "password" .svc.natsAuth.passwordKey "token" .svc.natsAuth.tokenKey "creds" .svc.natsAuth.credsKey "nkeySeed" .svc.natsAuth.nkeySeedKey) -}}
{{- else if $auth.existingSecret -}}
{{- toYaml (dict "secret" $auth.existingSecret "user" $auth.userKey "password" $auth.passwordKey "token" $auth.tokenKey "creds" $auth.credsKey "nkeySeed" $auth.nkeySeedKey) -}}
{{- else if $inline -}}
{{- toYaml (dict "secret" (printf "%s-nats" (include "jetpool.fullname" .root)) "user" (ternary "user" "" (not (empty $auth.user))) "password" (ternary "password" "" (not (empty $auth.password))) "token" (ternary "token" "" (not (empty $auth.token))) "creds" "" "nkeySeed" "") -}}
{{- else -}}
{{- toYaml (dict "secret" "") -}}
{{- end -}}
{{- end -}}
