{{- define "fireflyer.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "fireflyer.labels" -}}
app.kubernetes.io/name: fireflyer
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: fireflyer
{{- end -}}

{{- define "fireflyer.selectorLabels" -}}
app.kubernetes.io/name: fireflyer
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}
